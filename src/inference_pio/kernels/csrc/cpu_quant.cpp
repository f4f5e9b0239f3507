// Native CPU kernels for inference_pio's quantized weights: AVX2 + FMA + F16C, OpenMP.
//
// Weight layouts are those of inference_pio/layers/quantization/formats.py:
//   int4: qweight uint8 [rows, cols_p/2], scales fp16 [rows, cols_p/group]; in each 64-column
//         block byte i holds column i (low nibble) and column i+32 (high nibble); w = (n-8)*s.
//   int8: qweight int8 [rows, cols], scales fp32 [rows]; w = q * s.
//
// Activations (fp32) are quantized inside each call, per row in blocks of QK = 32 columns with
// one fp32 scale per block (llama.cpp's Q8_0):
//   d = amax / 127,  q = round_half_even(x * (1 / d))  (q = 0 where d == 0),
// zero padded to the weight's padded width. inference_pio/kernels/reference.py emulates this
// bit for bit. Dot products are integer (vpmaddubsw + vpmaddwd), scaled per block in fp32:
//   int4: sum_j s_w(j) d_x(j) (sum_i n_i q_i - 8 sum_i q_i)   (n = unsigned nibble)
//   int8: s_w sum_j d_x(j) sum_i |w_i| sign(q_i, w_i)
//
// Work split: rows across OpenMP threads (torch's thread count); 2 rows x up to 4 tokens share
// one register tile (each weight byte is unpacked once per 4 tokens); weights are prefetched
// PREFETCH_BYTES ahead; prefill walks tokens in blocks of TOKEN_BLOCK so a row's activations
// stay in L2 while its weights are read once per block. The fused MoE call quantizes x once,
// runs gate and up of every routed expert (work items: expert x 64 rows, dynamic schedule),
// SiLU-mul, re-quantizes the hidden vectors, runs down, and sums in slot order.
//
// Ops are registered as torch.ops.inference_pio.* (torch/library.h: far quicker to compile
// than torch/extension.h); inference_pio/kernels/cpu.py builds, loads and wraps them.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <immintrin.h>
#include <omp.h>

#include "moe_routing.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

// The AVX-512 VNNI kernels (int4_vnni.h, int8_vnni.h) where the build enables those instructions
// (kernels/cpu.py adds the flags when the CPU has them).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define PIO_VNNI 1
#endif

namespace {

constexpr int64_t QK = 32;             // activation block: columns per fp32 scale
constexpr int64_t PACK = 64;           // int4 packing block
constexpr int64_t MAX_NT = 4;          // tokens per register tile
constexpr int64_t MAX_NR = 2;          // rows per register tile
constexpr int64_t TOKEN_BLOCK = 128;   // tokens per pass over the weights (prefill)
constexpr int64_t PREFETCH_BYTES = 4096;  // how far ahead of the rows in use weights are fetched
constexpr int64_t PAR_MIN_WORK = 1 << 16;  // below this many weight bytes x tokens: one thread

// ---- vector helpers --------------------------------------------------------------------

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// f(std::integral_constant<int, nt>{}) for nt = 1..MAX_NT: a register tile's token count as a
// compile-time constant.
template <class F>
inline void with_nt(int nt, F&& f) {
  switch (nt) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

int num_threads_for(int64_t work) {
  return work >= PAR_MIN_WORK ? std::max(1, at::get_num_threads()) : 1;
}

// ---- activation quantization (Q8, blocks of 32) -----------------------------------------

// Storage that quantized activations reuse from call to call (one per calling thread and use:
// no allocation on the decode path).
struct Q8Arena {
  std::vector<int8_t> q;
  std::vector<float> d, s, dp, sp, v;
};

// Quantized activations of `rows` rows: q [rows, cols_p] int8, d and s [rows, nb] fp32 (the
// block's scale, and the sum of its 32 codes). dp and sp [rows, 2 * nb] repeat d and s in the
// order the int4 kernel's combined scales need, for each whole group of 8 blocks j..j+7:
// [d(j), d(j), d(j+1), d(j+1), d(j+4), d(j+4), d(j+5), d(j+5),
//  d(j+2), d(j+2), d(j+3), d(j+3), d(j+6), d(j+6), d(j+7), d(j+7)].
struct Q8 {
  const int8_t* q = nullptr;
  const float* d = nullptr;
  const float* s = nullptr;
  const float* dp = nullptr;
  const float* sp = nullptr;
  const float* v = nullptr;  // [rows, nb / 2, 4]: see vnni_constants (VNNI builds only)
  int64_t rows = 0, cols_p = 0, nb = 0;

  const int8_t* qrow(int64_t t) const { return q + t * cols_p; }
  const float* drow(int64_t t) const { return d + t * nb; }
  const float* srow(int64_t t) const { return s + t * nb; }
  const float* dprow(int64_t t) const { return dp + t * 2 * nb; }
  const float* sprow(int64_t t) const { return sp + t * 2 * nb; }
  const float* vrow(int64_t t) const { return v + t * (nb / 2) * 4; }
};

// For each 64-column block b (activation blocks 2b, 2b + 1), what the VNNI int4 kernel scales
// its integer sums by: d(2b), d(2b + 1) / 16, 8 s(2b) d(2b), 8 s(2b + 1) d(2b + 1).
inline void vnni_constants(const float* d, const float* s, int64_t nb, float* v) {
  for (int64_t b = 0; b < nb / 2; ++b) {
    v[4 * b] = d[2 * b];
    v[4 * b + 1] = d[2 * b + 1] * 0.0625f;
    v[4 * b + 2] = 8.0f * s[2 * b] * d[2 * b];
    v[4 * b + 3] = 8.0f * s[2 * b + 1] * d[2 * b + 1];
  }
}

// v (nb values) -> the dp / sp order above (whole groups of 8 only).
inline void pair_pattern(const float* v, int64_t nb, float* out) {
  static constexpr int kOrder[16] = {0, 0, 1, 1, 4, 4, 5, 5, 2, 2, 3, 3, 6, 6, 7, 7};
  for (int64_t j = 0; j + 8 <= nb; j += 8)
    for (int i = 0; i < 16; ++i) out[2 * j + i] = v[j + kOrder[i]];
}

// 32 floats -> 32 int8 codes; returns the block scale, *sum = sum of the codes.
inline float quant_block(const float* x, int8_t* q, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
  __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
  __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
  m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
  const float amax = hmax(m);
  const float d = amax / 127.0f;
  const float id = d > 0.0f ? 1.0f / d : 0.0f;
  const __m256 mul = _mm256_set1_ps(id);
  constexpr int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), R));
  __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), R));
  __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), R));
  __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), R));
  *sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
  i0 = _mm256_packs_epi32(i0, i1);
  i2 = _mm256_packs_epi32(i2, i3);
  i0 = _mm256_packs_epi16(i0, i2);
  i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), i0);
  return d;
}

// One row of `cols` floats -> cols_p codes (zero padded), nb = cols_p / QK scales and sums.
void quant_row(const float* x, int64_t cols, int64_t cols_p, int8_t* q, float* d, float* s) {
  const int64_t full = cols / QK;
  int32_t sum = 0;
  for (int64_t j = 0; j < full; ++j) {
    d[j] = quant_block(x + j * QK, q + j * QK, &sum);
    s[j] = static_cast<float>(sum);
  }
  const int64_t rem = cols - full * QK;
  if (rem > 0) {
    alignas(32) float tmp[QK] = {0};
    std::memcpy(tmp, x + full * QK, rem * sizeof(float));
    d[full] = quant_block(tmp, q + full * QK, &sum);
    s[full] = static_cast<float>(sum);
  }
  const int64_t done = full + (rem > 0);
  const int64_t nb = cols_p / QK;
  if (nb > done) {
    std::memset(q + done * QK, 0, (nb - done) * QK);
    std::fill(d + done, d + nb, 0.0f);
    std::fill(s + done, s + nb, 0.0f);
  }
}

void quant_row(const float* x, int64_t cols, int64_t cols_p, int8_t* q, float* d, float* s,
               float* dp, float* sp) {
  quant_row(x, cols, cols_p, q, d, s);
  pair_pattern(d, cols_p / QK, dp);
  pair_pattern(s, cols_p / QK, sp);
}

// Rows of x [rows, ldx] (first `cols` columns) -> Q8 with cols_p columns.
Q8 quantize_rows(const float* x, int64_t ldx, int64_t rows, int64_t cols, int64_t cols_p,
                 Q8Arena& arena) {
  Q8 a;
  a.rows = rows;
  a.cols_p = cols_p;
  a.nb = cols_p / QK;
  if (static_cast<int64_t>(arena.q.size()) < rows * cols_p) arena.q.resize(rows * cols_p);
  if (static_cast<int64_t>(arena.d.size()) < rows * a.nb) {
    arena.d.resize(rows * a.nb);
    arena.s.resize(rows * a.nb);
    arena.dp.resize(rows * a.nb * 2);
    arena.sp.resize(rows * a.nb * 2);
#ifdef PIO_VNNI
    arena.v.resize(rows * (a.nb / 2) * 4);
#endif
  }
  int8_t* q = arena.q.data();
  float* d = arena.d.data();
  float* s = arena.s.data();
  float* dp = arena.dp.data();
  float* sp = arena.sp.data();
  float* v = arena.v.data();
  const int64_t nb = a.nb;
  const int nth = num_threads_for(rows * cols * 8);
#pragma omp parallel for num_threads(nth) schedule(static)
  for (int64_t t = 0; t < rows; ++t) {
    quant_row(x + t * ldx, cols, cols_p, q + t * cols_p, d + t * nb, s + t * nb,
              dp + t * 2 * nb, sp + t * 2 * nb);
#ifdef PIO_VNNI  // only the VNNI int4 kernel reads them
    vnni_constants(d + t * nb, s + t * nb, nb, v + t * (nb / 2) * 4);
#endif
  }
  a.q = q;
  a.d = d;
  a.s = s;
  a.dp = dp;
  a.sp = sp;
  a.v = v;
  return a;
}

thread_local Q8Arena x_arena, h_arena;  // a call's input activations; the MoE hidden vectors

// A float buffer of at least n elements, kept between calls (contents undefined).
float* reuse(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// 0, 1, ..., n-1 (token indices of a plain linear call), kept between calls.
const int32_t* iota(int64_t n) {
  thread_local std::vector<int32_t> v;
  while (static_cast<int64_t>(v.size()) < n) v.push_back(static_cast<int32_t>(v.size()));
  return v.data();
}

// ---- int4 -------------------------------------------------------------------------------
//
// Rows go in pairs (an odd last row is paired with itself). For each 64-column block and
// token, the four 32-column dot products (row 0 low / high half, row 1 low / high half) are
// reduced together: vpmaddubsw (nibble x code, pairs summed to int16), two levels of
// unpack + add (reduce4), one vpmaddwd, leaving int32 lanes [r0 lo, r1 lo, r0 hi, r1 hi] in
// each 128-bit half; one vcvtdq2ps and one FMA with the four combined scales s_w * d_x finish
// the block. (On Zen 1 the integer multiplies share one port: this needs a quarter of the
// vpmaddwd / convert / FMA work of reducing each 32-column block on its own.) An int16 lane
// never exceeds 4 * 2 * 15 * 127 = 15240, so nothing saturates.

struct Int4Mat {
  const uint8_t* q;
  const at::Half* s;
  int64_t rows, cols_p, ngroups;
  int shift;  // log2(group / 32): activation block j uses scale j >> shift
  bool packed = false;  // q in the VNNI tile order (int4_vnni.h), rows a multiple of 16

  const uint8_t* qrow(int64_t r) const { return q + r * (cols_p / 2); }
  const at::Half* srow(int64_t r) const { return s + r * ngroups; }
  int64_t bytes() const { return rows * (cols_p / 2 + ngroups * 2); }
};

// Weight scales of rows 0 and 1 for activation blocks j..j+7 (j % 8 == 0) in the order of
// Q8::dp: wl = [w0(j), w1(j), w0(j+1), w1(j+1) | same for j+4, j+5], wh = the same for j+2,
// j+3 | j+6, j+7. SHIFT = log2(group / 32): block j uses scale j >> SHIFT. (No cross-lane
// shuffles: those are slow on Zen 1.)
template <int SHIFT>
inline void pair_weight_scales(const at::Half* s0, const at::Half* s1, int64_t j, __m256& wl,
                               __m256& wh) {
  if constexpr (SHIFT == 0) {
    const __m256 f0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s0 + j)));
    const __m256 f1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s1 + j)));
    wl = _mm256_unpacklo_ps(f0, f1);
    wh = _mm256_unpackhi_ps(f0, f1);
  } else if constexpr (SHIFT == 1) {  // groups A B C D cover blocks j..j+7 two by two
    const __m128 f0 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s0 + j / 2)));
    const __m128 f1 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s1 + j / 2)));
    const __m128 ul = _mm_unpacklo_ps(f0, f1), uh = _mm_unpackhi_ps(f0, f1);  // A0A1B0B1 C0C1D0D1
    wl = _mm256_set_m128(_mm_movelh_ps(uh, uh), _mm_movelh_ps(ul, ul));
    wh = _mm256_set_m128(_mm_movehl_ps(uh, uh), _mm_movehl_ps(ul, ul));
  } else {  // groups A B cover blocks j..j+7 four by four
    int32_t a0, a1;
    std::memcpy(&a0, s0 + j / 4, sizeof(a0));
    std::memcpy(&a1, s1 + j / 4, sizeof(a1));
    const __m128 u = _mm_unpacklo_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(a0)),
                                     _mm_cvtph_ps(_mm_cvtsi32_si128(a1)));  // A0 A1 B0 B1
    wl = wh = _mm256_set_m128(_mm_movehl_ps(u, u), _mm_movelh_ps(u, u));
  }
}

// Where the four combined scales of 64-column block b start in a token's dd row: blocks go
// in groups of four stored in the order b0, b2, b1, b3 (what vunpck{l,h}ps produce).
inline int64_t dd_slot(int64_t b) {
  return (b >> 2) * 16 + (((b & 1) << 1) | ((b >> 1) & 1)) * 4;
}

// Floats of one token's dd row for `nb` activation blocks (nb / 2 64-column blocks).
inline int64_t dd_stride(int64_t nb) { return (nb / 2 + 3) / 4 * 16; }

// The whole groups of 8 activation blocks of int4_pair_scales.
template <int NT, int SHIFT>
inline void int4_pair_scales_vec(const at::Half* s0, const at::Half* s1, int64_t vec_end,
                                 const float* const* dp, const float* const* sp,
                                 float* __restrict dd, int64_t stride, __m256* ol, __m256* oh) {
  for (int64_t j = 0; j < vec_end; j += 8) {
    __m256 wl, wh;
    pair_weight_scales<SHIFT>(s0, s1, j, wl, wh);
    for (int t = 0; t < NT; ++t) {
      const __m256 lo = _mm256_mul_ps(wl, _mm256_loadu_ps(dp[t] + 2 * j));
      const __m256 hi = _mm256_mul_ps(wh, _mm256_loadu_ps(dp[t] + 2 * j + 8));
      ol[t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(sp[t] + 2 * j), ol[t]);
      oh[t] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(sp[t] + 2 * j + 8), oh[t]);
      float* e = dd + t * stride + 2 * j;  // j / 2 = first 64-column block of the four
      _mm256_storeu_ps(e, lo);
      _mm256_storeu_ps(e + 8, hi);
    }
  }
}

// Combined scales of rows (r0, r1) for NT tokens: dd [NT][dd_stride] holds, for each 64-column
// block b at dd_slot(b), s_w * d_x of blocks (r0, 2b), (r1, 2b), (r0, 2b+1), (r1, 2b+1);
// off [NT][2] gets 8 * sum_j s_w(j) d_x(j) sum_q(j), what the unsigned-nibble dot product
// must lose.
template <int NT>
inline void int4_pair_scales(const Int4Mat& W, int64_t r0, int64_t r1, const Q8& a,
                             const int32_t* tok, float* __restrict dd, float* off) {
  const int64_t nb = a.nb, vec_end = nb / 8 * 8, stride = dd_stride(nb);
  const int shift = W.shift;
  const at::Half* s0 = W.srow(r0);
  const at::Half* s1 = W.srow(r1);
  const float* dp[NT];
  const float* sp[NT];
  __m256 ol[NT], oh[NT];
  for (int t = 0; t < NT; ++t) {
    dp[t] = a.dprow(tok[t]);
    sp[t] = a.sprow(tok[t]);
    ol[t] = oh[t] = _mm256_setzero_ps();
  }
  switch (shift) {
    case 0: int4_pair_scales_vec<NT, 0>(s0, s1, vec_end, dp, sp, dd, stride, ol, oh); break;
    case 1: int4_pair_scales_vec<NT, 1>(s0, s1, vec_end, dp, sp, dd, stride, ol, oh); break;
    default: int4_pair_scales_vec<NT, 2>(s0, s1, vec_end, dp, sp, dd, stride, ol, oh);
  }
  for (int t = 0; t < NT; ++t) {
    const __m256 o = _mm256_add_ps(ol[t], oh[t]);  // lanes alternate rows 0 and 1
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(o), _mm256_extractf128_ps(o, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    float f0 = _mm_cvtss_f32(h), f1 = _mm_cvtss_f32(_mm_movehdup_ps(h));
    const float* xd = a.drow(tok[t]);
    const float* xs = a.srow(tok[t]);
    for (int64_t j = vec_end; j < nb; ++j) {
      const float v0 = static_cast<float>(s0[j >> shift]) * xd[j];
      const float v1 = static_cast<float>(s1[j >> shift]) * xd[j];
      float* e = dd + t * stride + dd_slot(j / 2) + 2 * (j & 1);
      e[0] = v0;
      e[1] = v1;
      f0 += v0 * xs[j];
      f1 += v1 * xs[j];
    }
    off[2 * t] = 8.0f * f0;
    off[2 * t + 1] = 8.0f * f1;
  }
}

// Four int16 vectors a, b, c, d (16 lanes each, one 32-column block each) -> int32 lanes
// [sum a, sum b, sum c, sum d] in each 128-bit half (the two halves add up to the block sums).
// vpunpck + vpaddw, one vpmaddwd: vphaddw costs 3 cycles on Zen 1, these 1 or less.
inline __m256i reduce4(__m256i a, __m256i b, __m256i c, __m256i d, __m256i ones) {
  const __m256i ab = _mm256_add_epi16(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
  const __m256i cd = _mm256_add_epi16(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
  return _mm256_madd_epi16(
      _mm256_add_epi16(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd)), ones);
}

// out [NT][2] = sum over blocks of dd * (nibbles of rows r0, r1) . (codes of token tok[t]).
template <int NT>
inline void int4_pair_tile(const Int4Mat& W, int64_t r0, int64_t r1, const Q8& a,
                           const int32_t* tok, const float* dd, float* out) {
  const int64_t nblk = W.cols_p / PACK, stride = dd_stride(a.nb);
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const uint8_t* w0 = W.qrow(r0);
  const uint8_t* w1 = W.qrow(r1);
  const int8_t* x[NT];
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) {
    x[t] = a.qrow(tok[t]);
    acc[t] = _mm256_setzero_ps();
  }
  // prefetch the rows of the pair PREFETCH_BYTES ahead (whole pairs: cols_p bytes each)
  const int64_t ahead = std::max<int64_t>(1, PREFETCH_BYTES / W.cols_p) * W.cols_p;
  for (int64_t b = 0; b < nblk; ++b) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + ahead + 32 * b), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + ahead + 32 * b), _MM_HINT_T0);
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 32 * b));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + 32 * b));
    const __m256i lo0 = _mm256_and_si256(v0, m4);
    const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
    const __m256i lo1 = _mm256_and_si256(v1, m4);
    const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
    const float* e = dd + dd_slot(b);
    for (int t = 0; t < NT; ++t) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t] + 64 * b));
      const __m256i x1 =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t] + 64 * b + 32));
      const __m256i p = reduce4(_mm256_maddubs_epi16(lo0, x0), _mm256_maddubs_epi16(lo1, x0),
                                _mm256_maddubs_epi16(hi0, x1), _mm256_maddubs_epi16(hi1, x1),
                                ones);
      const __m256 scale = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(e + t * stride));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));  // [r0, r1, ., .]
    out[2 * t] = _mm_cvtss_f32(s);
    out[2 * t + 1] = _mm_cvtss_f32(_mm_movehdup_ps(s));
  }
}

// Rows r and r+1 (or r alone when `single`) for NT tokens into y[t * ldy + row].
template <int NT>
inline void int4_pair(const Int4Mat& W, int64_t r, bool single, const Q8& a, const int32_t* tok,
                      float* dd, float* y, int64_t ldy) {
  const int64_t r1 = single ? r : r + 1;
  float off[2 * NT], out[2 * NT];
  int4_pair_scales<NT>(W, r, r1, a, tok, dd, off);
  int4_pair_tile<NT>(W, r, r1, a, tok, dd, out);
  for (int t = 0; t < NT; ++t) {
    y[t * ldy + r] = out[2 * t] - off[2 * t];
    if (!single) y[t * ldy + r + 1] = out[2 * t + 1] - off[2 * t + 1];
  }
}

// y[t * ldy + r] = row r of W . activations tok[t], for r in [r0, r1), t in [0, T).
// dd: scratch of MAX_NT * dd_stride(a.nb) floats.
void int4_rows(const Int4Mat& W, int64_t r0, int64_t r1, const Q8& a, const int32_t* tok,
               int64_t T, float* y, int64_t ldy, float* dd) {
  for (int64_t tb = 0; tb < T; tb += TOKEN_BLOCK) {
    const int64_t te = std::min(T, tb + TOKEN_BLOCK);
    for (int64_t r = r0; r < r1; r += 2) {
      const bool single = r + 1 == r1;
      for (int64_t t = tb; t < te; t += MAX_NT)
        with_nt(static_cast<int>(std::min(MAX_NT, te - t)), [&](auto n) {
          int4_pair<decltype(n)::value>(W, r, single, a, tok + t, dd, y + t * ldy, ldy);
        });
    }
  }
}

// The VNNI tile's lane order (int4_vnni.h's transposition; vnni_pack_ stores it, in every
// build): lane i of a 16-row tile holds row kLaneRow[i]. Self-inverse.
constexpr int kLaneRow[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};

#ifdef PIO_VNNI
#include "int4_vnni.h"
constexpr int64_t ROW_UNIT = VNNI_ROWS;  // linear() splits rows between threads on tiles
constexpr const char* KERNEL_ISA = "avx512vnni";
#else
constexpr int64_t ROW_UNIT = MAX_NR;
constexpr const char* KERNEL_ISA = "avx2";
#endif

// ---- int8 -------------------------------------------------------------------------------
//
// Rows go in pairs, as for int4. vpmaddubsw needs an unsigned operand: |w| times the code
// with w's sign (vpsignb), |products| <= 2 * 127 * 127 = 32258, so each 32-column block is
// widened on its own (vpmaddwd); vphaddd then packs rows 0 and 1 into one vector
// ([r0, r0, r1, r1] per 128-bit half) so one convert and one FMA with the activation block's
// scale serve both rows. The row scales multiply the sums at the end.

struct Int8Mat {
  const int8_t* q;
  const float* s;
  int64_t rows, cols;
  bool packed = false;  // q in the VNNI tile order (int8_vnni.h): rows of 16, cols of 32

  const int8_t* qrow(int64_t r) const { return q + r * cols; }
  int64_t bytes() const { return rows * (cols + 4); }
};

template <int NT>
inline void int8_pair_block(const int8_t* w0, const int8_t* w1, const int8_t* const* x,
                            const float* const* xd, int64_t j, __m256* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0));
  const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1));
  const __m256i a0 = _mm256_sign_epi8(v0, v0), a1 = _mm256_sign_epi8(v1, v1);
  for (int t = 0; t < NT; ++t) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t] + j * QK));
    const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(xv, v0)), ones);
    const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(xv, v1)), ones);
    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(p0, p1)),
                             _mm256_broadcast_ss(xd[t] + j), acc[t]);
  }
}

// y[t * ldy + row] for rows r, r1 (r1 == r: one row) and NT tokens.
template <int NT>
inline void int8_pair(const Int8Mat& W, int64_t r, bool single, const Q8& a, const int32_t* tok,
                      float* y, int64_t ldy) {
  const int64_t r1 = single ? r : r + 1;
  const int8_t* x[NT];
  const float* xd[NT];
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) {
    x[t] = a.qrow(tok[t]);
    xd[t] = a.drow(tok[t]);
    acc[t] = _mm256_setzero_ps();
  }
  const int64_t full = W.cols / QK, rem = W.cols % QK;
  const int8_t* w0 = W.qrow(r);
  const int8_t* w1 = W.qrow(r1);
  const int64_t ahead = std::max<int64_t>(1, PREFETCH_BYTES / (2 * W.cols)) * 2 * W.cols;
  for (int64_t j = 0; j < full; ++j) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + ahead + j * QK), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + ahead + j * QK), _MM_HINT_T0);
    int8_pair_block<NT>(w0 + j * QK, w1 + j * QK, x, xd, j, acc);
  }
  if (rem > 0) {  // last partial block: copies (the activation codes are zero past cols)
    alignas(32) int8_t t0[QK] = {0}, t1[QK] = {0};
    std::memcpy(t0, w0 + full * QK, rem);
    std::memcpy(t1, w1 + full * QK, rem);
    int8_pair_block<NT>(t0, t1, x, xd, full, acc);
  }
  for (int t = 0; t < NT; ++t) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
    s = _mm_hadd_ps(s, s);  // [r0, r1, r0, r1]
    y[t * ldy + r] = _mm_cvtss_f32(s) * W.s[r];
    if (!single) y[t * ldy + r + 1] = _mm_cvtss_f32(_mm_movehdup_ps(s)) * W.s[r1];
  }
}

void int8_rows(const Int8Mat& W, int64_t r0, int64_t r1, const Q8& a, const int32_t* tok,
               int64_t T, float* y, int64_t ldy, float* /*scratch*/) {
  for (int64_t tb = 0; tb < T; tb += TOKEN_BLOCK) {
    const int64_t te = std::min(T, tb + TOKEN_BLOCK);
    for (int64_t r = r0; r < r1; r += 2) {
      const bool single = r + 1 == r1;
      for (int64_t t = tb; t < te; t += MAX_NT)
        with_nt(static_cast<int>(std::min(MAX_NT, te - t)), [&](auto n) {
          int8_pair<decltype(n)::value>(W, r, single, a, tok + t, y + t * ldy, ldy);
        });
    }
  }
}

// ---- format dispatch (int4 / int8 share the drivers below) ------------------------------

// `after`: the weights the caller reads next, for the kernels that prefetch them (or nullptr).
inline void rows_kernel(const Int4Mat& W, int64_t r0, int64_t r1, const Q8& a,
                        const int32_t* tok, int64_t T, float* y, int64_t ldy, float* scratch,
                        const void* after = nullptr) {
#ifdef PIO_VNNI
  int4_rows_vnni(W, r0, r1, a, tok, T, y, ldy, scratch, after);
#else
  int4_rows(W, r0, r1, a, tok, T, y, ldy, scratch);
#endif
}
#ifdef PIO_VNNI
#include "int8_vnni.h"
#endif

inline void rows_kernel(const Int8Mat& W, int64_t r0, int64_t r1, const Q8& a,
                        const int32_t* tok, int64_t T, float* y, int64_t ldy, float* scratch,
                        [[maybe_unused]] const void* after = nullptr) {
#ifdef PIO_VNNI
  int8_rows_vnni(W, r0, r1, a, tok, T, y, ldy, scratch, after);
#else
  int8_rows(W, r0, r1, a, tok, T, y, ldy, scratch);
#endif
}
// Scratch floats a thread needs for activations of nb blocks (the int4 combined scales).
inline int64_t scratch_floats(int64_t nb) { return MAX_NT * dd_stride(nb); }
inline int64_t act_cols(const Int4Mat& W) { return W.cols_p; }
inline int64_t act_cols(const Int8Mat& W) { return (W.cols + QK - 1) / QK * QK; }

// y [T, rows] = W . a for all rows, rows split across threads in contiguous ranges.
template <class Mat>
void linear(const Mat& W, const Q8& a, float* y) {
  const int64_t T = a.rows;
  const int32_t* tok = iota(T);
  const int nth = num_threads_for(W.bytes() * T);
#pragma omp parallel num_threads(nth)
  {
    const int n = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t units = (W.rows + ROW_UNIT - 1) / ROW_UNIT;  // split on tile boundaries
    const int64_t r0 = std::min(W.rows, units * id / n * ROW_UNIT);
    const int64_t r1 = std::min(W.rows, units * (id + 1) / n * ROW_UNIT);
    std::vector<float> scratch(scratch_floats(a.nb));
    if (r1 > r0) rows_kernel(W, r0, r1, a, tok, T, y, W.rows, scratch.data());
  }
}

// ---- fused routed experts ---------------------------------------------------------------

template <class Mat>
struct ExpertMats {
  std::vector<Mat> gate, up, down;  // indexed by expert id
};

// out [T, H] = sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t,k], summed in
// slot order k = 0.. for each token (deterministic); a slot whose id is -1 is skipped. With
// per_slot, out is [T, k, H]: each slot's unweighted down_e(...) (zeros where skipped), which
// callers that run the experts in several calls (paged experts) sum in slot order themselves.
template <class Mat>
at::Tensor moe(const at::Tensor& x, const ExpertMats<Mat>& M, const at::Tensor& topk_w,
               const at::Tensor& topk_ids, bool per_slot) {
  const int64_t T = x.size(0), H = x.size(1), k = topk_ids.size(1);
  const int64_t E = static_cast<int64_t>(M.gate.size());
  const int64_t* ids = topk_ids.data_ptr<int64_t>();
  const float* tw = topk_w.data_ptr<float>();
  at::Tensor out = per_slot ? at::zeros({T, k, H}, x.options()) : at::zeros({T, H}, x.options());

  const pio_moe::Routing R = pio_moe::group_by_expert(ids, T, k, E);
  const int64_t n = R.n;
  if (n == 0) return out;
  const std::vector<int64_t>& count = R.count;
  const std::vector<int32_t>& token_of = R.token_of;
  const std::vector<int32_t>& used = R.used;
  const Mat& g0 = M.gate[used[0]];
  const Mat& d0 = M.down[used[0]];
  for (int32_t e : used) {
    TORCH_CHECK(M.gate[e].rows == g0.rows && M.up[e].rows == g0.rows && M.down[e].rows == H &&
                    act_cols(M.gate[e]) == act_cols(g0) && act_cols(M.up[e]) == act_cols(g0) &&
                    act_cols(M.down[e]) == act_cols(d0),
                "expert ", e, " has shapes that differ from expert ", used[0], "'s");
  }
  const int64_t I = g0.rows;
  const int32_t* pos = iota(n);

  // 1) activations once; gate and up rows of every used expert, silu(g) * u
  const Q8 a = quantize_rows(x.data_ptr<float>(), H, T, H, act_cols(g0), x_arena);
  thread_local std::vector<float> g_buf, u_buf, y_buf;
  float* G = reuse(g_buf, n * I);
  float* U = reuse(u_buf, n * I);
  constexpr int64_t RC1 = 64, RC2 = 128;  // rows per work item
  const int64_t c1 = (I + RC1 - 1) / RC1;
  const int64_t items1 = static_cast<int64_t>(used.size()) * c1;
  const int64_t nth1 = num_threads_for(g0.bytes() * 2 * static_cast<int64_t>(used.size()));
#pragma omp parallel num_threads(nth1)
  {
    std::vector<float> scratch(scratch_floats(std::max(a.nb, act_cols(d0) / QK)));
    // static: each thread walks a contiguous run of items, so it knows (and prefetches) the
    // weights it reads next
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items1; ++it) {
      const int32_t e = used[it / c1];
      const int64_t r0 = it % c1 * RC1, r1 = std::min(I, r0 + RC1);
      const int64_t p0 = count[e], np = count[e + 1] - p0;
      const void* next = it + 1 < items1 ? M.gate[used[(it + 1) / c1]].qrow((it + 1) % c1 * RC1)
                                         : nullptr;
      rows_kernel(M.gate[e], r0, r1, a, token_of.data() + p0, np, G + p0 * I, I,
                  scratch.data(), M.up[e].qrow(r0));
      rows_kernel(M.up[e], r0, r1, a, token_of.data() + p0, np, U + p0 * I, I,
                  scratch.data(), next);
      for (int64_t p = p0; p < p0 + np; ++p)
        pio_vec::silu_mul_inplace(G + p * I + r0, U + p * I + r0, r1 - r0);
    }
  }

  // 2) down projection of each assignment's hidden vector
  const Q8 h = quantize_rows(G, I, n, I, act_cols(d0), h_arena);
  float* Y = reuse(y_buf, n * H);
  const int64_t c2 = (H + RC2 - 1) / RC2;
  const int64_t items2 = static_cast<int64_t>(used.size()) * c2;
#pragma omp parallel num_threads(nth1)
  {
    std::vector<float> scratch(scratch_floats(h.nb));
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items2; ++it) {
      const int32_t e = used[it / c2];
      const int64_t r0 = it % c2 * RC2, r1 = std::min(H, r0 + RC2);
      const int64_t p0 = count[e], np = count[e + 1] - p0;
      const void* next = it + 1 < items2 ? M.down[used[(it + 1) / c2]].qrow((it + 1) % c2 * RC2)
                                         : nullptr;
      rows_kernel(M.down[e], r0, r1, h, pos + p0, np, Y + p0 * H, H,
                  scratch.data(), next);
    }
  }

  // 3) weighted sum in slot order (or the slots themselves)
  // a few FMAs per element: threads only for big T
  pio_moe::slot_sum(R, Y, tw, T, k, H, per_slot, out.data_ptr<float>(),
                    num_threads_for(n * H / 8));
  return out;
}

// ---- argument checks and tensor -> matrix views -----------------------------------------

void check_cpu_contig(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", c10::toString(dtype), ", got ",
              c10::toString(t.scalar_type()));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_acts(const at::Tensor& x, int64_t cols) {
  check_cpu_contig(x, "x", at::kFloat);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [T, cols], got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) == cols, "x has ", x.size(1), " columns, the weight has ", cols);
}

int group_shift(int64_t group) {
  switch (group) {
    case 32: return 0;
    case 64: return 1;
    case 128: return 2;
    default: TORCH_CHECK(false, "int4 group must be 32, 64 or 128, got ", group);
  }
  return 0;
}

// View one int4 weight (qweight [rows, cols_p/2], scales [rows, ngroups]) of `cols` columns.
Int4Mat int4_mat(const uint8_t* q, const at::Half* s, int64_t rows, int64_t half_cols,
                 int64_t ngroups, int64_t cols) {
  const int64_t cols_p = half_cols * 2;
  TORCH_CHECK(cols_p % PACK == 0, "int4 qweight has ", half_cols,
              " bytes per row, not a multiple of 32");
  TORCH_CHECK(ngroups > 0 && cols_p % ngroups == 0, "int4 scales have ", ngroups,
              " groups per row, which does not divide ", cols_p, " columns");
  const int64_t group = cols_p / ngroups;
  const int shift = group_shift(group);
  TORCH_CHECK(cols <= cols_p && cols_p - cols < std::max<int64_t>(PACK, group),
              "int4 weight stores ", cols_p, " columns, which is not ", cols,
              " padded to a multiple of ", std::max<int64_t>(PACK, group));
  return Int4Mat{q, s, rows, cols_p, ngroups, shift, false};
}


Int4Mat int4_mat(const at::Tensor& qweight, const at::Tensor& scales, int64_t cols) {
  check_cpu_contig(qweight, "qweight", at::kByte);
  check_cpu_contig(scales, "scales", at::kHalf);
  TORCH_CHECK(qweight.dim() == 2 && scales.dim() == 2 && scales.size(0) == qweight.size(0),
              "int4 qweight [rows, cols_p/2] and scales [rows, groups] expected, got ",
              qweight.sizes(), " and ", scales.sizes());
  return int4_mat(qweight.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(), qweight.size(0),
                  qweight.size(1), scales.size(1), cols);
}

Int8Mat int8_mat(const at::Tensor& qweight, const at::Tensor& scales) {
  check_cpu_contig(qweight, "qweight", at::kChar);
  check_cpu_contig(scales, "scales", at::kFloat);
  TORCH_CHECK(qweight.dim() == 2 && scales.dim() == 1 && scales.size(0) == qweight.size(0),
              "int8 qweight [rows, cols] and scales [rows] expected, got ", qweight.sizes(),
              " and ", scales.sizes());
  return Int8Mat{qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), qweight.size(0),
                 qweight.size(1)};
}

void check_routing(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ids) {
  check_cpu_contig(x, "x", at::kFloat);
  check_cpu_contig(w, "topk_weights", at::kFloat);
  check_cpu_contig(ids, "topk_ids", at::kLong);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [T, hidden]");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && w.sizes() == ids.sizes(),
              "topk_weights and topk_ids must both be [T, k] with T = ", x.size(0), ", got ",
              w.sizes(), " and ", ids.sizes());
}

// Stacked int4 experts [E, rows, ...] -> one Int4Mat per expert.
std::vector<Int4Mat> int4_stack(const at::Tensor& q, const at::Tensor& s, int64_t cols,
                                const char* name) {
  check_cpu_contig(q, name, at::kByte);
  check_cpu_contig(s, name, at::kHalf);
  TORCH_CHECK(q.dim() == 3 && s.dim() == 3 && q.size(0) == s.size(0) && q.size(1) == s.size(1),
              name, ": stacked qweight [E, rows, cols_p/2] and scales [E, rows, groups] "
              "expected, got ", q.sizes(), " and ", s.sizes());
  std::vector<Int4Mat> out;
  const int64_t E = q.size(0), rows = q.size(1);
  for (int64_t e = 0; e < E; ++e) {
    out.push_back(int4_mat(q.data_ptr<uint8_t>() + e * rows * q.size(2),
                           s.data_ptr<at::Half>() + e * rows * s.size(2), rows, q.size(2),
                           s.size(2), cols));
  }
  return out;
}

std::vector<Int8Mat> int8_stack(const at::Tensor& q, const at::Tensor& s, int64_t cols,
                                const char* name) {
  check_cpu_contig(q, name, at::kChar);
  check_cpu_contig(s, name, at::kFloat);
  TORCH_CHECK(q.dim() == 3 && s.dim() == 2 && q.size(0) == s.size(0) && q.size(1) == s.size(1),
              name, ": stacked qweight [E, rows, cols] and scales [E, rows] expected, got ",
              q.sizes(), " and ", s.sizes());
  TORCH_CHECK(q.size(2) == cols, name, " has ", q.size(2), " columns, expected ", cols);
  std::vector<Int8Mat> out;
  const int64_t E = q.size(0), rows = q.size(1);
  for (int64_t e = 0; e < E; ++e) {
    out.push_back(Int8Mat{q.data_ptr<int8_t>() + e * rows * cols,
                          s.data_ptr<float>() + e * rows, rows, cols});
  }
  return out;
}

std::vector<Int4Mat> int4_list(at::TensorList q, at::TensorList s,
                               int64_t cols) {
  TORCH_CHECK(q.size() == s.size(), "qweight and scales lists differ in length");
  std::vector<Int4Mat> out;
  for (size_t e = 0; e < q.size(); ++e) out.push_back(int4_mat(q[e], s[e], cols));
  return out;
}

std::vector<Int8Mat> int8_list(at::TensorList q, at::TensorList s,
                               int64_t cols) {
  TORCH_CHECK(q.size() == s.size(), "qweight and scales lists differ in length");
  std::vector<Int8Mat> out;
  for (size_t e = 0; e < q.size(); ++e) {
    out.push_back(int8_mat(q[e], s[e]));
    TORCH_CHECK(out.back().cols == cols, "expert weight has ", out.back().cols,
                " columns, expected ", cols);
  }
  return out;
}

// ---- weights stored in the VNNI tile order (formats.pack_vnni) ---------------------------

inline int64_t row_bytes(const Int4Mat& W) { return W.cols_p / 2; }
inline int64_t row_bytes(const Int8Mat& W) { return W.cols; }

// The same view of a weight whose qweight is in the VNNI tile order: whole 16-row tiles of
// 32-byte blocks, read by the avx512vnni kernels only.
template <class Mat>
Mat packed(Mat W) {
#ifdef PIO_VNNI
  TORCH_CHECK(W.rows % VNNI_ROWS == 0 && row_bytes(W) % 32 == 0, "packed weights need rows in "
              "multiples of 16 and rows of whole 32-byte blocks, got [", W.rows, ", ",
              row_bytes(W), "]");
  W.packed = true;
#else
  TORCH_CHECK(false, "packed weights need the avx512vnni kernels (this build: ", KERNEL_ISA, ")");
#endif
  return W;
}

// `Stack` (int4_stack / int8_stack) over packed qweights.
template <class Mat, std::vector<Mat> (*Stack)(const at::Tensor&, const at::Tensor&, int64_t,
                                               const char*)>
std::vector<Mat> stack_packed(const at::Tensor& q, const at::Tensor& s, int64_t cols,
                              const char* name) {
  std::vector<Mat> out = Stack(q, s, cols, name);
  for (Mat& W : out) W = packed(W);
  return out;
}

// ---- entry points -----------------------------------------------------------------------

std::vector<at::Tensor> quantize_q8(const at::Tensor& x, int64_t cols_p) {
  check_cpu_contig(x, "x", at::kFloat);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D");
  TORCH_CHECK(cols_p % QK == 0 && cols_p >= x.size(1), "cols_p must be a multiple of ", QK,
              " and at least x's columns");
  Q8Arena arena;
  const Q8 a = quantize_rows(x.data_ptr<float>(), x.size(1), x.size(0), x.size(1), cols_p, arena);
  at::Tensor q = at::empty({a.rows, cols_p}, at::kChar);
  at::Tensor d = at::empty({a.rows, a.nb}, at::kFloat);
  at::Tensor s = at::empty({a.rows, a.nb}, at::kFloat);
  std::memcpy(q.data_ptr<int8_t>(), a.q, a.rows * cols_p);
  std::memcpy(d.data_ptr<float>(), a.d, a.rows * a.nb * sizeof(float));
  std::memcpy(s.data_ptr<float>(), a.s, a.rows * a.nb * sizeof(float));
  return {q, d, s};
}

at::Tensor int4_linear_as(const at::Tensor& x, const Int4Mat& W, int64_t cols) {
  at::Tensor y = at::empty({x.size(0), W.rows}, x.options());
  if (x.size(0) == 0 || W.rows == 0) return y;
  const Q8 a = quantize_rows(x.data_ptr<float>(), cols, x.size(0), cols, W.cols_p, x_arena);
  linear(W, a, y.data_ptr<float>());
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       int64_t cols) {
  check_acts(x, cols);
  return int4_linear_as(x, int4_mat(qweight, scales, cols), cols);
}

at::Tensor int4_linear_packed(const at::Tensor& x, const at::Tensor& qweight,
                              const at::Tensor& scales, int64_t cols) {
  check_acts(x, cols);
  return int4_linear_as(x, packed(int4_mat(qweight, scales, cols)), cols);
}

at::Tensor int8_linear_as(const at::Tensor& x, const Int8Mat& W) {
  check_acts(x, W.cols);
  at::Tensor y = at::empty({x.size(0), W.rows}, x.options());
  if (x.size(0) == 0 || W.rows == 0) return y;
  const Q8 a = quantize_rows(x.data_ptr<float>(), W.cols, x.size(0), W.cols, act_cols(W),
                             x_arena);
  linear(W, a, y.data_ptr<float>());
  return y;
}

at::Tensor int8_linear_packed(const at::Tensor& x, const at::Tensor& qweight,
                              const at::Tensor& scales) {
  return int8_linear_as(x, packed(int8_mat(qweight, scales)));
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  return int8_linear_as(x, int8_mat(qweight, scales));
}

// int4 / int8 qweight [..., rows, width] (rows a multiple of 16, width of 32 bytes) into the
// VNNI tile order in place (or back, `unpack`): per 16-row tile and 32-byte block b, byte
// 4j + c of the block in row kLaneRow[i] goes to 512 b + 64 j + 4 i + c of the tile (the
// layout of formats.pack_vnni, which tests this against the torch version). Tiles in parallel,
// each through a thread's copy of it (16 x width bytes).
void vnni_pack_(const at::Tensor& q, bool unpack) {
  TORCH_CHECK(q.device().is_cpu() && q.is_contiguous() && q.dim() >= 2 &&
                  (q.scalar_type() == at::kByte || q.scalar_type() == at::kChar),
              "vnni_pack_: qweight must be a contiguous uint8 / int8 CPU tensor [..., rows, "
              "bytes]");
  const int64_t rows = q.size(-2), width = q.size(-1);
  TORCH_CHECK(rows % 16 == 0 && width % 32 == 0, "VNNI tiles need rows in multiples of 16 and "
              "rows of whole 32-byte blocks, got [", rows, ", ", width, "]");
  const int64_t tile = 16 * width, tiles = q.numel() / tile;
  auto* base = static_cast<uint8_t*>(q.data_ptr());
  const int nth = num_threads_for(q.numel());
#pragma omp parallel num_threads(nth)
  {
    std::vector<uint8_t> copy(static_cast<size_t>(tile));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      uint8_t* p = base + t * tile;
      std::memcpy(copy.data(), p, tile);
      for (int64_t b = 0; b < width / 32; ++b)
        for (int j = 0; j < 8; ++j)
          for (int i = 0; i < 16; ++i) {
            uint8_t* packed_at = (unpack ? copy.data() : p) + 512 * b + 64 * j + 4 * i;
            uint8_t* plain_at = (unpack ? p : copy.data()) + kLaneRow[i] * width + 32 * b + 4 * j;
            if (unpack) std::memcpy(plain_at, packed_at, 4);
            else std::memcpy(packed_at, plain_at, 4);
          }
    }
  }
}

// One fused MoE over stacked experts [E, ...]; `Stack` turns a (qweight, scales) pair into one
// matrix view per expert (int4_stack / int8_stack). Registered directly as int4_moe / int8_moe.
template <class Mat, std::vector<Mat> (*Stack)(const at::Tensor&, const at::Tensor&, int64_t,
                                               const char*)>
at::Tensor moe_stacked(const at::Tensor& x, const at::Tensor& gq, const at::Tensor& gs,
                       const at::Tensor& uq, const at::Tensor& us, const at::Tensor& dq,
                       const at::Tensor& ds, const at::Tensor& topk_w,
                       const at::Tensor& topk_ids, bool per_slot) {
  check_routing(x, topk_w, topk_ids);
  const int64_t H = x.size(1);
  TORCH_CHECK(gq.dim() == 3 && dq.dim() == 3, "stacked expert weights [E, rows, ...] expected");
  const int64_t I = gq.size(1);
  ExpertMats<Mat> M{Stack(gq, gs, H, "gate"), Stack(uq, us, H, "up"), Stack(dq, ds, I, "down")};
  TORCH_CHECK(M.up.size() == M.gate.size() && M.down.size() == M.gate.size(),
              "gate, up and down have different expert counts");
  return moe(x, M, topk_w, topk_ids, per_slot);
}

// The same over lists of per-expert tensors (experts paged in one at a time); registered as
// int4_moe_list / int8_moe_list.
template <class Mat, std::vector<Mat> (*List)(at::TensorList, at::TensorList, int64_t)>
at::Tensor moe_listed(const at::Tensor& x, at::TensorList gq, at::TensorList gs,
                      at::TensorList uq, at::TensorList us, at::TensorList dq,
                      at::TensorList ds, const at::Tensor& topk_w, const at::Tensor& topk_ids,
                      bool per_slot) {
  check_routing(x, topk_w, topk_ids);
  TORCH_CHECK(!gq.empty() && gq.size() == uq.size() && gq.size() == dq.size(),
              "gate, up and down lists must have the same, non-zero length");
  const int64_t H = x.size(1), I = gq[0].size(0);
  ExpertMats<Mat> M{List(gq, gs, H), List(uq, us, H), List(dq, ds, I)};
  return moe(x, M, topk_w, topk_ids, per_slot);
}

}  // namespace

// Registered as torch.ops.inference_pio.<name> (no pybind11: torch/extension.h alone takes
// minutes to compile on a small machine, these headers a fraction of that).
std::string kernel_isa() { return KERNEL_ISA; }

TORCH_LIBRARY(inference_pio, m) {
  m.def("kernel_isa() -> str", &kernel_isa);
  m.def("quantize_q8(Tensor x, int cols_p) -> Tensor[]", &quantize_q8);
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, int cols) -> Tensor", &int4_linear);
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor", &int8_linear);
  m.def("int4_moe(Tensor x, Tensor gate_q, Tensor gate_s, Tensor up_q, Tensor up_s, "
        "Tensor down_q, Tensor down_s, Tensor topk_weights, Tensor topk_ids, "
        "bool per_slot=False) -> Tensor",
        &moe_stacked<Int4Mat, int4_stack>);
  m.def("int4_moe_list(Tensor x, Tensor[] gate_q, Tensor[] gate_s, Tensor[] up_q, "
        "Tensor[] up_s, Tensor[] down_q, Tensor[] down_s, Tensor topk_weights, "
        "Tensor topk_ids, bool per_slot=False) -> Tensor",
        &moe_listed<Int4Mat, int4_list>);
  m.def("vnni_pack_(Tensor(a!) qweight, bool unpack=False) -> ()", &vnni_pack_);
  m.def("int4_linear_packed(Tensor x, Tensor qweight, Tensor scales, int cols) -> Tensor",
        &int4_linear_packed);
  m.def("int4_moe_packed(Tensor x, Tensor gate_q, Tensor gate_s, Tensor up_q, Tensor up_s, "
        "Tensor down_q, Tensor down_s, Tensor topk_weights, Tensor topk_ids, "
        "bool per_slot=False) -> Tensor",
        &moe_stacked<Int4Mat, stack_packed<Int4Mat, int4_stack>>);
  m.def("int8_moe(Tensor x, Tensor gate_q, Tensor gate_s, Tensor up_q, Tensor up_s, "
        "Tensor down_q, Tensor down_s, Tensor topk_weights, Tensor topk_ids, "
        "bool per_slot=False) -> Tensor",
        &moe_stacked<Int8Mat, int8_stack>);
  m.def("int8_linear_packed(Tensor x, Tensor qweight, Tensor scales) -> Tensor",
        &int8_linear_packed);
  m.def("int8_moe_packed(Tensor x, Tensor gate_q, Tensor gate_s, Tensor up_q, Tensor up_s, "
        "Tensor down_q, Tensor down_s, Tensor topk_weights, Tensor topk_ids, "
        "bool per_slot=False) -> Tensor",
        &moe_stacked<Int8Mat, stack_packed<Int8Mat, int8_stack>>);
  m.def("int8_moe_list(Tensor x, Tensor[] gate_q, Tensor[] gate_s, Tensor[] up_q, "
        "Tensor[] up_s, Tensor[] down_q, Tensor[] down_s, Tensor topk_weights, "
        "Tensor topk_ids, bool per_slot=False) -> Tensor",
        &moe_listed<Int8Mat, int8_list>);
}
