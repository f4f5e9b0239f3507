// The routing bookkeeping every fused MoE kernel shares (cpu_quant.cpp's int4 / int8 experts,
// cpu_float.cpp's bf16 / fp16 experts): assignments grouped by expert, and the weighted sum.
#pragma once

#include <ATen/core/Tensor.h>
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace pio_moe {

// The valid slots (id >= 0) of topk_ids [T, k], sorted by expert, then token, then slot:
// assignment p of expert e is in [count[e], count[e + 1]), token_of[p] is its token;
// pos_of[t * k + s] is slot (t, s)'s assignment (-1: skipped); `used` lists the experts with at
// least one assignment, ascending.
struct Routing {
  int64_t n = 0;
  std::vector<int64_t> count;
  std::vector<int32_t> token_of, pos_of, used;
};

inline Routing group_by_expert(const int64_t* ids, int64_t T, int64_t k, int64_t E) {
  Routing r;
  r.count.assign(E + 1, 0);
  for (int64_t i = 0; i < T * k; ++i) {
    TORCH_CHECK(ids[i] >= -1 && ids[i] < E, "topk_ids has expert ", ids[i], ", only ", E,
                " experts were given (-1 skips a slot)");
    if (ids[i] >= 0) ++r.count[ids[i] + 1];
  }
  for (int64_t e = 0; e < E; ++e) r.count[e + 1] += r.count[e];
  r.n = r.count[E];
  r.token_of.resize(r.n);
  r.pos_of.assign(T * k, -1);
  std::vector<int64_t> fill(r.count.begin(), r.count.end() - 1);
  for (int64_t i = 0; i < T * k; ++i) {
    if (ids[i] < 0) continue;
    const int64_t p = fill[ids[i]]++;
    r.token_of[p] = static_cast<int32_t>(i / k);
    r.pos_of[i] = static_cast<int32_t>(p);
  }
  for (int64_t e = 0; e < E; ++e)
    if (r.count[e + 1] > r.count[e]) r.used.push_back(static_cast<int32_t>(e));
  return r;
}

// o [T, H] += sum over slots s in order of w[t, s] * Y[pos_of[t, s]] (Y [n, H]); with per_slot,
// o is [T, k, H] and gets each slot's row as it is.
inline void slot_sum(const Routing& r, const float* Y, const float* w, int64_t T, int64_t k,
                     int64_t H, bool per_slot, float* o, int nth) {
#pragma omp parallel for num_threads(nth) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t s = 0; s < k; ++s) {
      if (r.pos_of[t * k + s] < 0) continue;
      const float* yrow = Y + static_cast<int64_t>(r.pos_of[t * k + s]) * H;
      if (per_slot) {
        std::memcpy(o + (t * k + s) * H, yrow, H * sizeof(float));
        continue;
      }
      const float wt = w[t * k + s];
      float* orow = o + t * H;
      for (int64_t c = 0; c < H; ++c) orow[c] += wt * yrow[c];
    }
  }
}

}  // namespace pio_moe
