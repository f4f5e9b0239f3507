// Native CPU kernels for bf16 / fp16 weights with fp32 activations: AVX2 + FMA + F16C, OpenMP.
//
//   float_linear(x fp32 [T, K], weight bf16 | fp16 [N, K]) -> y fp32 [T, N] = x @ weight^T
//
// Weights are widened to fp32 in registers (exactly: bf16 codes shifted into the high half of
// a 32-bit lane, fp16 through vcvtph2ps), so every product and sum is fp32. Columns go in steps
// of 16: two 8-lane vectors of weights `lo` and `hi` (bf16: the even and the odd columns of the
// 16, a shift and an AND of one 256-bit load; fp16: the first and the second 8), against the
// activations repacked once per call in the same order and zero padded to Kp = K rounded up to
// 16 (a partial last step copies the weights into zeros). Each (row, token) output is one
// 8-lane fp32 accumulator, acc += lo * x_lo; acc += hi * x_hi step after step, then a
// horizontal sum: an order that does not depend on T, the tile or the thread split, so a
// token's output is the same, bit for bit, whatever the other tokens of the call.
//
// Work split: rows across OpenMP threads (torch's thread count, one thread for small calls) in
// contiguous ranges; register tiles of NR rows x NT tokens (NT <= MAX_NT) share each widened
// weight vector between NT tokens and each activation vector between NR rows; the rows of the
// next tiles are prefetched. Up to MAX_NT tokens (decode) the tiles stream the weights from
// memory once. With more, tokens go in blocks of TOKEN_BLOCK and a thread walks its rows in
// blocks that stay in L2, running every token tile of the token block over a row block before
// the next one: weights come from memory once per TOKEN_BLOCK tokens. bf16 rows are widened in
// the tiles (a shift or an AND per 8 weights, off the FMA ports); fp16 rows, from kWidenFrom
// tokens, are first widened into an fp32 row block (vcvtph2ps shares the FMA ports of Zen 1:
// once per weight instead of once per token tile).
//
// Measured on 2 Zen 1 cores (~18 GB/s): 151936 x 2048 bf16 (622 MB), T = 1: ~33 ms (19 GB/s);
// T = 4: ~39 ms; from T = 8 compute-bound at ~70 GFLOP/s (fp16 ~60).
//
// Ops are registered as torch.ops.inference_pio.* (cpu_quant.cpp holds the namespace's
// TORCH_LIBRARY block, this file a fragment); inference_pio/kernels/cpu.py builds and wraps them.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_bf16.h"
#include "moe_routing.h"
#include "vec_math.h"

#define PIO_INLINE inline __attribute__((always_inline))

namespace {

constexpr int64_t VEC = 8;                    // fp32 lanes of a register
constexpr int64_t STEP = 16;                  // columns per step (two vectors)
constexpr int MAX_NT = 4;                     // tokens per register tile
constexpr int64_t ROW_UNIT = 12;              // thread ranges and row blocks: multiples of this
constexpr int64_t ROW_BLOCK_BYTES = 128 << 10;  // stored weights of one row block (L2)
constexpr int64_t TOKEN_BLOCK = 64;           // tokens per pass over the weights
constexpr int64_t PREFETCH_BYTES = 4096;      // how far ahead of the tile weights are fetched
constexpr int64_t PAR_MIN_WORK = 1 << 16;     // below this many weight bytes x tokens: one thread

// Rows per register tile for NT tokens: NR * NT accumulators + NR weight vectors + one
// activation vector fit in the 16 ymm registers.
constexpr int rows_for(int nt) { return nt <= 2 ? 4 : 3; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

int num_threads_for(int64_t work) {
  return work >= PAR_MIN_WORK ? std::max(1, at::get_num_threads()) : 1;
}

// ---- weight formats: 16 stored weights -> two fp32 vectors (lo, hi) ----------------------

struct BF16 {  // lo = the 8 even columns, hi = the 8 odd ones (activations interleaved to match)
  using Elem = uint16_t;
  static constexpr bool kStream = true;  // read from memory: prefetch
  // From this many tokens, rows are widened into an fp32 block first (never: a shift and an
  // AND per 16 weights cost less than the extra buffer traffic).
  static constexpr int64_t kWidenFrom = INT64_MAX;
  static PIO_INLINE __m256 lo(const uint16_t* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
  static PIO_INLINE __m256 hi(const uint16_t* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
    return _mm256_castsi256_ps(_mm256_and_si256(v, high));
  }
};

struct FP16 {  // lo = columns 0..7, hi = 8..15
  using Elem = uint16_t;
  static constexpr bool kStream = true;
  static constexpr int64_t kWidenFrom = 3 * MAX_NT;  // vcvtph2ps shares the FMA ports
  static PIO_INLINE __m256 lo(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static PIO_INLINE __m256 hi(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + VEC)));
  }
};

struct F32 {  // weights already widened into the (lo, hi) order (an L2-resident row block)
  using Elem = float;
  static constexpr bool kStream = false;
  static PIO_INLINE __m256 lo(const float* p) { return _mm256_loadu_ps(p); }
  static PIO_INLINE __m256 hi(const float* p) { return _mm256_loadu_ps(p + VEC); }
};

// ---- register tiles ------------------------------------------------------------------------

// One call: repacked activations x [T, Kp], output y [T, N].
struct Acts {
  const float* x;
  float* y;
  int64_t Kp, N;
};

// A block of weight rows: row i at w + i * ld, `cols` columns (the stored K, or Kp when
// widened: whole steps only).
template <class Elem>
struct Rows {
  const Elem* w;
  int64_t ld, cols;
};

// One step of the tile: weights wr[i] + kw, activations xt[j] + k.
template <class W, int NR, int NT>
PIO_INLINE void tile_step(const typename W::Elem* const* wr, int64_t kw, const float* const* xt,
                          int64_t k, __m256 (&acc)[NR][NT]) {
  __m256 wv[NR];
  for (int i = 0; i < NR; ++i) wv[i] = W::lo(wr[i] + kw);
  for (int j = 0; j < NT; ++j) {
    const __m256 xv = _mm256_loadu_ps(xt[j] + k);
    for (int i = 0; i < NR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
  }
  for (int i = 0; i < NR; ++i) wv[i] = W::hi(wr[i] + kw);
  for (int j = 0; j < NT; ++j) {
    const __m256 xv = _mm256_loadu_ps(xt[j] + k + VEC);
    for (int i = 0; i < NR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
  }
}

// y[t + j, r + i] for i < NR, j < NT, from rows i of `R` (its row 0 is output row r).
template <class W, int NR, int NT>
void tile(const Rows<typename W::Elem>& R, const Acts& A, int64_t r, int64_t t, int64_t ahead) {
  using Elem = typename W::Elem;
  const int64_t cols = R.cols;
  const Elem* wr[NR];
  const float* xt[NT];
  __m256 acc[NR][NT];
  for (int i = 0; i < NR; ++i) wr[i] = R.w + i * R.ld;
  for (int j = 0; j < NT; ++j) xt[j] = A.x + (t + j) * A.Kp;
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t kv = cols / STEP * STEP;
  constexpr int64_t LINE = 64 / sizeof(Elem);  // columns per cache line
  int64_t k = 0;
  for (; k + LINE <= kv; k += LINE) {  // one prefetch per row and cache line
    if constexpr (W::kStream) {
      for (int i = 0; i < NR; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(wr[i] + ahead + k), _MM_HINT_T0);
    }
    for (int64_t s = 0; s < LINE; s += STEP) tile_step<W, NR, NT>(wr, k + s, xt, k + s, acc);
  }
  for (; k < kv; k += STEP) tile_step<W, NR, NT>(wr, k, xt, k, acc);
  if (k < cols) {  // the partial last step: weights copied into zeros (activations are zero
                   // padded)
    alignas(32) Elem tail[NR][STEP] = {};
    const Elem* tr[NR];
    for (int i = 0; i < NR; ++i) {
      std::memcpy(tail[i], wr[i] + k, (cols - k) * sizeof(Elem));
      tr[i] = tail[i];
    }
    tile_step<W, NR, NT>(tr, 0, xt, k, acc);
  }
  for (int j = 0; j < NT; ++j) {
    float* yt = A.y + (t + j) * A.N + r;
    for (int i = 0; i < NR; ++i) yt[i] = hsum(acc[i][j]);
  }
}

// Output rows [r, r + n) (rows 0..n-1 of R) for the NT tokens from t: whole tiles of
// rows_for(NT) rows, then one smaller tile for the rest.
template <class W, int NT>
void rows_nt(const Rows<typename W::Elem>& R, int64_t n, const Acts& A, int64_t r, int64_t t) {
  constexpr int NR = rows_for(NT);
  const int64_t tile_bytes = std::max<int64_t>(1, NR * R.ld * int64_t(sizeof(typename W::Elem)));
  const int64_t ahead = std::max<int64_t>(1, PREFETCH_BYTES / tile_bytes) * NR * R.ld;
  int64_t i = 0;
  for (; i + NR <= n; i += NR) {
    tile<W, NR, NT>({R.w + i * R.ld, R.ld, R.cols}, A, r + i, t, ahead);
  }
  const Rows<typename W::Elem> rest{R.w + i * R.ld, R.ld, R.cols};
  switch (n - i) {
    case 3: tile<W, 3, NT>(rest, A, r + i, t, ahead); break;
    case 2: tile<W, 2, NT>(rest, A, r + i, t, ahead); break;
    case 1: tile<W, 1, NT>(rest, A, r + i, t, ahead); break;
    default: break;
  }
}

// Tokens [t0, t1) over n rows, token tiles of MAX_NT and then the rest.
template <class W>
void token_tiles(const Rows<typename W::Elem>& R, int64_t n, const Acts& A, int64_t r,
                 int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; t += MAX_NT) {
    switch (std::min<int64_t>(MAX_NT, t1 - t)) {
      case 1: rows_nt<W, 1>(R, n, A, r, t); break;
      case 2: rows_nt<W, 2>(R, n, A, r, t); break;
      case 3: rows_nt<W, 3>(R, n, A, r, t); break;
      default: rows_nt<W, MAX_NT>(R, n, A, r, t);
    }
  }
}

// n rows of K stored weights -> out [n, Kp] fp32 in the (lo, hi) order of each step.
template <class W>
void widen_rows(const uint16_t* w, int64_t K, int64_t n, int64_t Kp, float* out) {
  const int64_t kv = K / STEP * STEP;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* src = w + i * K;
    float* dst = out + i * Kp;
    int64_t k = 0;
    for (; k < kv; k += STEP) {
      if (k % 32 == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(src + k + PREFETCH_BYTES / 2), _MM_HINT_T0);
      }
      _mm256_storeu_ps(dst + k, W::lo(src + k));
      _mm256_storeu_ps(dst + k + VEC, W::hi(src + k));
    }
    if (k < K) {
      alignas(32) uint16_t tail[STEP] = {};
      std::memcpy(tail, src + k, (K - k) * sizeof(uint16_t));
      _mm256_storeu_ps(dst + k, W::lo(tail));
      _mm256_storeu_ps(dst + k + VEC, W::hi(tail));
    }
  }
}

// Output rows [r0, r1) for all tokens.
template <class W>
void rows(const uint16_t* w, int64_t K, int64_t T, const Acts& A, int64_t r0, int64_t r1) {
  if (T <= MAX_NT) {  // decode: straight from memory
    token_tiles<W>({w + r0 * K, K, K}, r1 - r0, A, r0, 0, T);
    return;
  }
  const int64_t block = std::max<int64_t>(
      ROW_UNIT, ROW_BLOCK_BYTES / (2 * std::max<int64_t>(K, 1)) / ROW_UNIT * ROW_UNIT);
  if (T < W::kWidenFrom) {
    for (int64_t tb = 0; tb < T; tb += TOKEN_BLOCK) {
      const int64_t te = std::min(T, tb + TOKEN_BLOCK);
      for (int64_t b = r0; b < r1; b += block) {
        const int64_t n = std::min(r1, b + block) - b;
        token_tiles<W>({w + b * K, K, K}, n, A, b, tb, te);
      }
    }
    return;
  }
  const int64_t Kp = A.Kp;  // the row block widened: twice the bytes, still in L2
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < block * Kp) buf.resize(block * Kp);
  for (int64_t tb = 0; tb < T; tb += TOKEN_BLOCK) {
    const int64_t te = std::min(T, tb + TOKEN_BLOCK);
    for (int64_t b = r0; b < r1; b += block) {
      const int64_t n = std::min(r1, b + block) - b;
      widen_rows<W>(w + b * K, K, n, Kp, buf.data());
      token_tiles<F32>({buf.data(), Kp, Kp}, n, A, b, tb, te);
    }
  }
}

template <class W>
void linear(const uint16_t* w, int64_t N, int64_t K, int64_t T, const Acts& A) {
  const int nth = num_threads_for(N * K * 2 * T);
#pragma omp parallel num_threads(nth)
  {
    const int n = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t units = (N + ROW_UNIT - 1) / ROW_UNIT;  // split on ROW_UNIT boundaries
    const int64_t r0 = std::min(N, units * id / n * ROW_UNIT);
    const int64_t r1 = std::min(N, units * (id + 1) / n * ROW_UNIT);
    if (r1 > r0) rows<W>(w, K, T, A, r0, r1);
  }
}

// x [T, K] -> [T, Kp] zero padded, each 16 columns in the order the weights' (lo, hi) give
// (interleaved, for bf16: the 8 even columns, then the 8 odd ones). Kept between calls (one
// buffer per calling thread).
const float* repack(const float* x, int64_t T, int64_t K, int64_t Kp, bool interleaved) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < T * Kp) buf.resize(T * Kp);
  float* out = buf.data();
  const int nth = num_threads_for(T * K * 4);
#pragma omp parallel for num_threads(nth) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const float* src = x + t * K;
    float* dst = out + t * Kp;
    if (!interleaved) {
      std::memcpy(dst, src, K * sizeof(float));
      std::fill(dst + K, dst + Kp, 0.0f);
      continue;
    }
    const int64_t kv = K / STEP * STEP;
    const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    for (int64_t k = 0; k < kv; k += STEP) {
      const __m256 a = _mm256_loadu_ps(src + k), b = _mm256_loadu_ps(src + k + VEC);
      // [x0 x2 x8 x10 | x4 x6 x12 x14] and [x1 x3 x9 x11 | x5 x7 x13 x15], then lane order
      const __m256 even = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 odd = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
      _mm256_storeu_ps(dst + k, _mm256_permutevar8x32_ps(even, order));
      _mm256_storeu_ps(dst + k + VEC, _mm256_permutevar8x32_ps(odd, order));
    }
    for (int64_t k = kv; k < Kp; ++k) {
      const int64_t c = k - kv, col = kv + (c < VEC ? 2 * c : 2 * (c - VEC) + 1);
      dst[k] = col < K ? src[col] : 0.0f;
    }
  }
  return out;
}

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu(), "float_linear: x must be on the CPU, got ", x.device());
  TORCH_CHECK(weight.device().is_cpu(), "float_linear: weight must be on the CPU, got ",
              weight.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "float_linear: x must be Float (fp32), got ",
              c10::toString(x.scalar_type()));
  const at::ScalarType wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kBFloat16 || wt == at::kHalf,
              "float_linear: weight must be BFloat16 or Half, got ", c10::toString(wt));
  TORCH_CHECK(x.dim() == 2, "float_linear: x must be 2-D [T, K], got ", x.dim(), "-D ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 2, "float_linear: weight must be 2-D [N, K], got ", weight.dim(),
              "-D ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "float_linear: x has ", x.size(1),
              " columns, the weight has ", weight.size(1));
  TORCH_CHECK(x.is_contiguous(), "float_linear: x must be contiguous");
  TORCH_CHECK(weight.is_contiguous(), "float_linear: weight must be contiguous");
  const int64_t T = x.size(0), N = weight.size(0), K = x.size(1);
  at::Tensor y = at::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  const int64_t Kp = (K + STEP - 1) / STEP * STEP;
  const bool bf16 = wt == at::kBFloat16;
  const Acts A{repack(x.data_ptr<float>(), T, K, Kp, bf16), y.data_ptr<float>(), Kp, N};
  const auto* w = static_cast<const uint16_t*>(weight.data_ptr());
  if (bf16) {
    linear<BF16>(w, N, K, T, A);
  } else {
    linear<FP16>(w, N, K, T, A);
  }
  return y;
}

// ---- fused routed experts ----------------------------------------------------------------
//
// out [T, H] = sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) for bf16 / fp16 experts
// stacked gate, up [E, I, H] and down [E, H, I]: cpu_quant.cpp's int4_moe contract (slots summed
// in order, id -1 skips one). The tokens routed to each expert are gathered into one contiguous
// block of activations, so each routed expert is one small GEMM through `rows` (a weight is
// widened once per up to MAX_NT tokens); work items (expert, RC rows) are split statically
// among the threads; then SiLU-mul, the hidden vectors repacked, down, and the weighted sum.
// Every output element is `rows`' fixed-order dot product, so a token's result does not depend
// on the other tokens of the call.
// fn(expert, r0, r1, first assignment, assignments) for every work item (a used expert, RC of
// its `rows` rows), split statically among nth threads.
template <class F>
void for_items(const pio_moe::Routing& R, int64_t rows, int nth, F&& fn) {
  constexpr int64_t RC = 48;  // rows per work item (a multiple of ROW_UNIT)
  const int64_t per = (rows + RC - 1) / RC;
  const int64_t items = static_cast<int64_t>(R.used.size()) * per;
#pragma omp parallel for num_threads(nth) schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int32_t e = R.used[it / per];
    const int64_t r0 = it % per * RC;
    fn(e, r0, std::min(rows, r0 + RC), R.count[e], R.count[e + 1] - R.count[e]);
  }
}

// For bf16 experts with `amx_min` > 0 (kernels/cpu.py: where AMX-BF16 is granted), an expert
// with at least amx_min assignments runs on AMX tiles (cpu_amx.cpp: its activations and hidden
// vectors rounded to bf16, fp32 sums); the others, and every expert with amx_min = 0, through
// `rows` as above. Per expert, B tiles of its gathered rows (amx_bf16.h) start at off[e].
struct AmxActs {
  std::vector<int64_t> off;  // per expert: element offset of its B tiles, -1: not on AMX
  std::vector<uint16_t> buf;
};

inline void amx_pack(const pio_moe::Routing& R, const float* rows_in, int64_t K, int64_t amx_min,
                     AmxActs& A) {
  A.off.assign(R.count.size(), -1);
  int64_t total = 0;
  for (int32_t e : R.used) {
    const int64_t np = R.count[e + 1] - R.count[e];
    if (amx_min <= 0 || np < amx_min) continue;
    A.off[e] = total;
    total += (np + pio_amx::TB - 1) / pio_amx::TB * pio_amx::TB * K;
  }
  if (static_cast<int64_t>(A.buf.size()) < total) A.buf.resize(total);
  for (int32_t e : R.used)
    if (A.off[e] >= 0)
      pio_amx::pack_acts(rows_in + R.count[e] * K, R.count[e + 1] - R.count[e], K,
                         A.buf.data() + A.off[e]);
}

template <class W>
void moe_float(const float* x, int64_t H, int64_t I, const uint16_t* gate, const uint16_t* up,
               const uint16_t* down, const pio_moe::Routing& R, float* Y, int64_t amx_min) {
  const int64_t n = R.n, Hp = (H + STEP - 1) / STEP * STEP, Ip = (I + STEP - 1) / STEP * STEP;
  thread_local std::vector<float> xg_buf, g_buf, u_buf;
  if (static_cast<int64_t>(xg_buf.size()) < n * H) xg_buf.resize(n * H);
  if (static_cast<int64_t>(g_buf.size()) < n * I) {
    g_buf.resize(n * I);
    u_buf.resize(n * I);
  }
  for (int64_t p = 0; p < n; ++p)
    std::memcpy(xg_buf.data() + p * H, x + R.token_of[p] * H, H * sizeof(float));
  const bool bf16 = std::is_same<W, BF16>::value;
  thread_local AmxActs amx;  // read in the workers through these pointers, not by name
  amx_pack(R, xg_buf.data(), H, bf16 ? amx_min : 0, amx);
  const int64_t* aoff = amx.off.data();
  const uint16_t* abuf = amx.buf.data();
  const float* xr = repack(xg_buf.data(), n, H, Hp, bf16);  // [n, Hp]
  float* G = g_buf.data();
  float* U = u_buf.data();
  const int nth = num_threads_for(static_cast<int64_t>(R.used.size()) * I * H * 2 * 2);
  for_items(R, I, nth, [&](int32_t e, int64_t r0, int64_t r1, int64_t p0, int64_t np) {
    if (aoff[e] >= 0) {
      pio_amx::rows(gate + e * I * H, H, abuf + aoff[e], np, r0, r1, G + p0 * I, I);
      pio_amx::rows(up + e * I * H, H, abuf + aoff[e], np, r0, r1, U + p0 * I, I);
    } else {
      rows<W>(gate + e * I * H, H, np, Acts{xr + p0 * Hp, G + p0 * I, Hp, I}, r0, r1);
      rows<W>(up + e * I * H, H, np, Acts{xr + p0 * Hp, U + p0 * I, Hp, I}, r0, r1);
    }
    for (int64_t p = p0; p < p0 + np; ++p)
      pio_vec::silu_mul_inplace(G + p * I + r0, U + p * I + r0, r1 - r0);
  });
  amx_pack(R, G, I, bf16 ? amx_min : 0, amx);
  aoff = amx.off.data();
  abuf = amx.buf.data();
  const float* hr = repack(G, n, I, Ip, bf16);  // [n, Ip] (repack's buffer: xr is done with)
  for_items(R, H, nth, [&](int32_t e, int64_t r0, int64_t r1, int64_t p0, int64_t np) {
    if (aoff[e] >= 0) {
      pio_amx::rows(down + e * H * I, I, abuf + aoff[e], np, r0, r1, Y + p0 * H, H);
    } else {
      rows<W>(down + e * H * I, I, np, Acts{hr + p0 * Ip, Y + p0 * H, Ip, H}, r0, r1);
    }
  });
}

at::Tensor float_moe(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
                     const at::Tensor& down, const at::Tensor& topk_w,
                     const at::Tensor& topk_ids, int64_t amx_min_tokens) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.dim() == 2,
              "float_moe: x must be a contiguous fp32 CPU tensor [T, hidden]");
  const at::ScalarType wt = gate.scalar_type();
  TORCH_CHECK(wt == at::kBFloat16 || wt == at::kHalf,
              "float_moe: expert weights must be BFloat16 or Half, got ", c10::toString(wt));
  for (const at::Tensor* t : {&gate, &up, &down})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == wt && t->is_contiguous() &&
                    t->dim() == 3,
                "float_moe: gate, up and down must be contiguous [E, rows, cols] CPU tensors "
                "of one dtype");
  const int64_t T = x.size(0), H = x.size(1), E = gate.size(0), I = gate.size(1);
  TORCH_CHECK(gate.size(2) == H && up.sizes() == gate.sizes() && down.size(0) == E &&
                  down.size(1) == H && down.size(2) == I,
              "float_moe: expected gate and up [E, I, ", H, "] and down [E, ", H, ", I], got ",
              gate.sizes(), ", ", up.sizes(), ", ", down.sizes());
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong && topk_w.scalar_type() == at::kFloat &&
                  topk_ids.is_contiguous() && topk_w.is_contiguous() && topk_ids.dim() == 2 &&
                  topk_ids.size(0) == T && topk_w.sizes() == topk_ids.sizes(),
              "float_moe: topk_weights (fp32) and topk_ids (int64) must both be [T, k]");
  const int64_t k = topk_ids.size(1);
  at::Tensor out = at::zeros({T, H}, x.options());
  const pio_moe::Routing R = pio_moe::group_by_expert(topk_ids.data_ptr<int64_t>(), T, k, E);
  if (R.n == 0) return out;
  thread_local std::vector<float> y_buf;
  if (static_cast<int64_t>(y_buf.size()) < R.n * H) y_buf.resize(R.n * H);
  const auto* g = static_cast<const uint16_t*>(gate.data_ptr());
  const auto* u = static_cast<const uint16_t*>(up.data_ptr());
  const auto* d = static_cast<const uint16_t*>(down.data_ptr());
  if (amx_min_tokens > 0)
    TORCH_CHECK(wt == at::kBFloat16 && H % 32 == 0 && I % 32 == 0 && pio_amx::init(),
                "float_moe: AMX needs bf16 experts with hidden and expert sizes in multiples of "
                "32, and the tile state granted; pass amx_min_tokens=0");
  if (wt == at::kBFloat16) {
    moe_float<BF16>(x.data_ptr<float>(), H, I, g, u, d, R, y_buf.data(), amx_min_tokens);
  } else {
    moe_float<FP16>(x.data_ptr<float>(), H, I, g, u, d, R, y_buf.data(), 0);
  }
  pio_moe::slot_sum(R, y_buf.data(), topk_w.data_ptr<float>(), T, k, H, false,
                    out.data_ptr<float>(), num_threads_for(R.n * H / 8));
  return out;
}

}  // namespace

// Registered as torch.ops.inference_pio.* next to cpu_quant.cpp's ops.
TORCH_LIBRARY_FRAGMENT(inference_pio, m) {
  m.def("float_linear(Tensor x, Tensor weight) -> Tensor", &float_linear);
  m.def("float_moe(Tensor x, Tensor gate, Tensor up, Tensor down, Tensor topk_weights, "
        "Tensor topk_ids, int amx_min_tokens=0) -> Tensor", &float_moe);
}
