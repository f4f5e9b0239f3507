// bf16 weights times fp32 activations on Intel AMX tiles (tdpbf16ps), for CPUs that have
// AMX-BF16 (Sapphire Rapids and later):
//
//   amx_bf16_linear(x fp32 [T, K], weight bf16 [N, K]) -> y fp32 [T, N] = bf16(x) @ weight^T
//
// The activations are rounded to bf16 once per call (to nearest even), as vLLM's and
// llama.cpp's bf16 paths do; the products are exact and the sums fp32, and y stays fp32 (torch's
// bf16 GEMM would round the output to bf16: logits to 8 bits). The weight is the A operand, read
// in place: a tile is 16 weight rows x 32 columns (64 bytes a row, stride K). The activations
// are the B operand, repacked per call into AMX's pair layout: per block of 16 tokens and pair
// of columns p, the 16 tokens' (x[2p], x[2p + 1]). A C tile is 16 weight rows x 16 tokens of
// fp32 sums. Per 16 rows, up to 4 token blocks (64 tokens) share each A tile load (C tiles 0-3,
// A in 4, B in 5); more tokens take more passes over the rows (their 16 x K weights stay in L2).
// A (row, token) output is summed in the same order whatever the other tokens: batch invariant.
// K and N must be multiples of 32 and 16 (every linear of the model; kernels/cpu.py checks).
//
// One tdpbf16ps is 16 x 16 x 32 multiply-adds: the FMA units' work of ~256 instructions. On 2
// cores of a Xeon with AMX, the 151936 x 2048 lm_head at 16 tokens: see benchmarks/README.md.
// Compiled for AMX by the function targets below in every build; kernels/cpu.py calls it only
// where /proc/cpuinfo lists amx_bf16 and Linux grants the process the tile state
// (`amx_bf16_init`: arch_prctl ARCH_REQ_XCOMP_PERM, as oneDNN does).
//
// Registered as torch.ops.inference_pio.amx_* (a fragment of cpu_quant.cpp's library); the
// fused bf16 MoE (cpu_float.cpp) calls pio_amx::pack_acts / rows (amx_bf16.h) per expert.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_bf16.h"

namespace pio_amx {

constexpr int64_t KSTEP = 32;              // bf16 columns per tile step
constexpr int64_t RB = 16;                 // weight rows per tile
constexpr int MAX_BLOCKS = 4;              // token blocks sharing an A tile (C tiles 0-3)
constexpr int64_t PAR_MIN_WORK = 1 << 16;  // below this many weights x tokens: one thread
constexpr long ARCH_REQ_XCOMP_PERM = 0x1023;
constexpr long XFEATURE_XTILEDATA = 18;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool init() {  // the tile state is granted per process; asking again is harmless
  static const bool granted =
      syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return granted;
}

// x fp32 [T, K] -> B tiles: [ceil(T / 16)][K / 2][16 tokens][2] bf16 (tokens past T are zeros).
void pack_acts(const float* x, int64_t T, int64_t K, uint16_t* out) {
  const int64_t blocks = (T + TB - 1) / TB;
  std::memset(out, 0, static_cast<size_t>(blocks * K * TB) * sizeof(uint16_t));
  for (int64_t t = 0; t < T; ++t) {
    uint16_t* o = out + (t / TB) * K * TB + (t % TB) * 2;
    const float* xt = x + t * K;
    for (int64_t k = 0; k < K; k += 2) {
      const c10::BFloat16 a(xt[k]), b(xt[k + 1]);  // round to nearest even
      o[k * TB] = a.x;
      o[k * TB + 1] = b.x;
    }
  }
}

// Weight rows [r, r + 16) over token blocks [b0, b0 + NB): y[t, r + i].
template <int NB>
__attribute__((target("amx-tile,amx-bf16,avx512f")))
void row_block(const uint16_t* w, int64_t K, const uint16_t* xb, int64_t r, int64_t b0,
               int64_t T, float* y, int64_t N) {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (NB > 2) _tile_zero(2);
  if constexpr (NB > 3) _tile_zero(3);
  const uint16_t* a = w + r * K;
  const int64_t bstride = K * TB;  // elements per token block
  for (int64_t k = 0; k < K; k += KSTEP) {
    _tile_loadd(4, a + k, K * 2);
    const uint16_t* b = xb + b0 * bstride + k * TB;  // pair rows k/2 .. k/2 + 15
    _tile_loadd(5, b, TB * 4);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NB > 1) {
      _tile_loadd(5, b + bstride, TB * 4);
      _tile_dpbf16ps(1, 4, 5);
    }
    if constexpr (NB > 2) {
      _tile_loadd(5, b + 2 * bstride, TB * 4);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (NB > 3) {
      _tile_loadd(5, b + 3 * bstride, TB * 4);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  alignas(64) float c[MAX_BLOCKS][RB][TB];
  _tile_stored(0, c[0], TB * 4);
  if constexpr (NB > 1) _tile_stored(1, c[1], TB * 4);
  if constexpr (NB > 2) _tile_stored(2, c[2], TB * 4);
  if constexpr (NB > 3) _tile_stored(3, c[3], TB * 4);
  for (int nb = 0; nb < NB; ++nb)
    for (int64_t j = 0; j < TB && (b0 + nb) * TB + j < T; ++j) {
      float* yt = y + ((b0 + nb) * TB + j) * N + r;
      for (int64_t i = 0; i < RB; ++i) yt[i] = c[nb][i][j];
    }
}

__attribute__((target("amx-tile,amx-bf16,avx512f")))
void rows(const uint16_t* w, int64_t K, const uint16_t* xb, int64_t T, int64_t r0,
              int64_t r1, float* y, int64_t N) {
  TileConfig cfg;  // C tiles 0-3, A tile 4, B tile 5: 16 rows of 64 bytes each
  for (int i = 0; i < 6; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);  // per thread, per call (oneDNN loads its own in between)
  const int64_t blocks = (T + TB - 1) / TB;
  for (int64_t r = r0; r < r1; r += RB)
    for (int64_t b = 0; b < blocks; b += MAX_BLOCKS) {
      switch (std::min<int64_t>(MAX_BLOCKS, blocks - b)) {
        case 1: row_block<1>(w, K, xb, r, b, T, y, N); break;
        case 2: row_block<2>(w, K, xb, r, b, T, y, N); break;
        case 3: row_block<3>(w, K, xb, r, b, T, y, N); break;
        default: row_block<4>(w, K, xb, r, b, T, y, N); break;
      }
    }
  _tile_release();
}

}  // namespace pio_amx

namespace {

using namespace pio_amx;

at::Tensor amx_bf16_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.dim() == 2,
              "amx_bf16_linear: x must be a contiguous fp32 CPU tensor [T, K]");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kBFloat16 &&
                  weight.is_contiguous() && weight.dim() == 2,
              "amx_bf16_linear: weight must be a contiguous bf16 CPU tensor [N, K]");
  const int64_t T = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "amx_bf16_linear: x has ", K, " columns, weight ",
              weight.size(1));
  TORCH_CHECK(K % KSTEP == 0 && N % RB == 0, "amx_bf16_linear: K must be a multiple of 32 and N "
              "of 16, got K = ", K, ", N = ", N);
  TORCH_CHECK(init(), "amx_bf16_linear: Linux did not grant the AMX tile state");
  at::Tensor y = at::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  std::vector<uint16_t> xb(static_cast<size_t>((T + TB - 1) / TB * K * TB));
  pack_acts(x.data_ptr<float>(), T, K, xb.data());
  const auto* w = static_cast<const uint16_t*>(weight.data_ptr());
  float* out = y.data_ptr<float>();
  const int64_t chunks = N / RB;
  const int nth = static_cast<int>(std::min<int64_t>(
      N * K * T >= PAR_MIN_WORK ? std::max(1, at::get_num_threads()) : 1, chunks));
#pragma omp parallel num_threads(nth)
  {
    const int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t c0 = chunks * id / n, c1 = chunks * (id + 1) / n;
    if (c0 < c1) rows(w, K, xb.data(), T, c0 * RB, c1 * RB, out, N);
  }
  return y;
}

bool amx_bf16_usable() { return init(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(inference_pio, m) {
  m.def("amx_bf16_linear(Tensor x, Tensor weight) -> Tensor", &amx_bf16_linear);
  m.def("amx_bf16_usable() -> bool", &amx_bf16_usable);
}
