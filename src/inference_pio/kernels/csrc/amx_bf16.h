// The AMX bf16 building blocks of cpu_amx.cpp, for the fused bf16 MoE in cpu_float.cpp.
#pragma once

#include <cstdint>

namespace pio_amx {

constexpr int64_t TB = 16;  // tokens per B tile: pack_acts pads T up to a multiple

// Linux grants this process the AMX tile state (asked once); false: do not call rows().
bool init();

// x fp32 [T, K] (K even) -> B tiles [ceil(T / 16)][K / 2][16][2] bf16, rounded to nearest
// even, tokens past T zero: ceil(T / 16) * 16 * K elements at out.
void pack_acts(const float* x, int64_t T, int64_t K, uint16_t* out);

// y[t, r] (row stride N) for weight rows [r0, r1) (multiples of 16) of w [*, K] (K a multiple
// of 32) and the T tokens packed in xb: bf16 products, fp32 sums. Loads its tile config and
// releases the tiles: callable from any thread.
void rows(const uint16_t* w, int64_t K, const uint16_t* xb, int64_t T, int64_t r0, int64_t r1,
          float* y, int64_t N);

}  // namespace pio_amx
