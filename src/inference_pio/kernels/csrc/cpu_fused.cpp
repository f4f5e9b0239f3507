// The small fused ops of a Qwen3 decoder layer on the CPU, fp32 throughout (AVX2 + FMA):
//
//   rms_norm(x, w, eps)                     y = x * rsqrt(mean(x^2) + eps) * w, per row
//   add_rms_norm_(x, residual, w, eps)      residual += x; x = rms_norm(residual) (in place)
//   qk_norm_rope_(q, k, qw, kw, cos, sin)   per head: RMSNorm, then rotate-half RoPE (in place)
//   route_topk(logits, k, renormalize)      softmax over experts, top k (descending), renorm
//   silu_mul(gate, up)                      silu(gate) * up
//   decode_attention(q, k_rows, v_rows, slots, offsets, scale)
//                                           one query per sequence and head against that
//                                           sequence's KV rows at `slots` of a paged cache,
//                                           read in place (no gather); a batch in one call
//   kv_store_(k_rows, v_rows, slots, k, v)  write new K/V rows to their slots
//
// Each replaces 4-10 eager torch ops (a launch, an allocation and a pass over memory each) with
// one pass. The plain-torch versions in inference_pio/layers are the references; sums of squares
// run in a different order than torch's mean, so results agree to fp32 rounding, not bit for bit.
// Rows are split across OpenMP threads only when there are many (prefill); a decode step's
// ops are a few microseconds and stay on the calling thread.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t PAR_MIN_ELEMS = 1 << 15;  // fewer elements than this: one thread

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ",
              c10::toString(t.scalar_type()));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

template <class F>
void for_rows(int64_t rows, int64_t cols, const F& fn) {
  if (rows * cols < PAR_MIN_ELEMS || rows < 2) {
    for (int64_t r = 0; r < rows; ++r) fn(r);
    return;
  }
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fn(r);
  });
}

inline float sum_squares(const float* x, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    acc0 = _mm256_fmadd_ps(a, a, acc0);
    acc1 = _mm256_fmadd_ps(b, b, acc1);
  }
  float s = hsum8(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// y = x * inv * w over n values (y may alias x)
inline void scale_mul(const float* x, float inv, const float* w, float* y, int64_t n) {
  const __m256 vi = _mm256_set1_ps(inv);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(w + i),
                                          _mm256_mul_ps(_mm256_loadu_ps(x + i), vi)));
  for (; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

inline float inv_rms(const float* x, int64_t n, double eps) {
  return 1.0f / std::sqrt(sum_squares(x, n) / static_cast<float>(n) + static_cast<float>(eps));
}

void check_norm(const at::Tensor& x, const at::Tensor& w) {
  check_f32(x, "x");
  check_f32(w, "weight");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && x.size(-1) == w.size(0), "weight has ",
              w.numel(), " values, x's rows have ", x.dim() ? x.size(-1) : 0);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_norm(x, w);
  const int64_t H = w.size(0), rows = H ? x.numel() / H : 0;
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_rows(rows, H, [&](int64_t r) {
    scale_mul(xp + r * H, inv_rms(xp + r * H, H, eps), wp, yp + r * H, H);
  });
  return y;
}

void add_rms_norm_(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w,
                   double eps) {
  check_norm(x, w);
  check_f32(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual has shape ", residual.sizes(),
              ", x has ", x.sizes());
  const int64_t H = w.size(0), rows = H ? x.numel() / H : 0;
  float *xp = x.data_ptr<float>(), *rp = residual.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  for_rows(rows, H, [&](int64_t r) {
    float *xr = xp + r * H, *rr = rp + r * H;
    int64_t i = 0;
    for (; i + 8 <= H; i += 8)
      _mm256_storeu_ps(rr + i, _mm256_add_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(rr + i)));
    for (; i < H; ++i) rr[i] = xr[i] + rr[i];
    scale_mul(rr, inv_rms(rr, H, eps), wp, xr, H);
  });
}

// One head row of D values: RMSNorm with w, then out[i] = x[i] cos[i] - x[i+h] sin[i],
// out[i+h] = x[i+h] cos[i+h] + x[i] sin[i+h] (h = D / 2).
inline void norm_rope_row(float* x, const float* w, const float* c, const float* s, int64_t D,
                          double eps, float* tmp) {
  scale_mul(x, inv_rms(x, D, eps), w, tmp, D);
  const int64_t h = D / 2;
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 a = _mm256_loadu_ps(tmp + i), b = _mm256_loadu_ps(tmp + h + i);
    _mm256_storeu_ps(x + i, _mm256_sub_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + i)),
                                          _mm256_mul_ps(b, _mm256_loadu_ps(s + i))));
    _mm256_storeu_ps(x + h + i, _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + h + i)),
                                              _mm256_mul_ps(a, _mm256_loadu_ps(s + h + i))));
  }
  for (; i < h; ++i) {
    const float a = tmp[i], b = tmp[h + i];
    x[i] = a * c[i] - b * s[i];
    x[h + i] = b * c[h + i] + a * s[h + i];
  }
}

void qk_norm_rope_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qw,
                   const at::Tensor& kw, const at::Tensor& cos, const at::Tensor& sin,
                   double eps) {
  for (auto* p : {&q, &k, &qw, &kw, &cos, &sin}) check_f32(*p, "q, k, their norm weights, cos and sin");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "q and k must be [T, heads, head_dim]");
  const int64_t T = q.size(0), Hq = q.size(1), Hk = k.size(1), D = q.size(2);
  TORCH_CHECK(k.size(0) == T && k.size(2) == D, "k is ", k.sizes(), ", q is ", q.sizes());
  TORCH_CHECK(D % 2 == 0, "head_dim must be even for rotate-half RoPE, got ", D);
  TORCH_CHECK(qw.numel() == D && kw.numel() == D, "q/k norm weights must have head_dim = ", D,
              " values");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "cos and sin must be [T, head_dim] = [", T, ", ", D, "], got ", cos.sizes(), " and ",
              sin.sizes());
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float *qwp = qw.data_ptr<float>(), *kwp = kw.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t H = Hq + Hk;
  for_rows(T * H, D, [&](int64_t r) {
    float tmp[512];
    std::vector<float> big;
    float* t = tmp;
    if (D > 512) {
      big.resize(D);
      t = big.data();
    }
    const int64_t tok = r / H, head = r % H;
    float* x = head < Hq ? qp + (tok * Hq + head) * D : kp + (tok * Hk + head - Hq) * D;
    norm_rope_row(x, head < Hq ? qwp : kwp, cp + tok * D, sp + tok * D, D, eps, t);
  });
}

std::tuple<at::Tensor, at::Tensor> route_topk(const at::Tensor& logits, int64_t k,
                                              bool renormalize) {
  check_f32(logits, "router logits");
  TORCH_CHECK(logits.dim() == 2, "router logits must be [T, experts]");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "top_k must be in 1..", E, ", got ", k);
  at::Tensor w = at::empty({T, k}, logits.options());
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  for_rows(T, E * 8, [&](int64_t t) {
    const float* l = lp + t * E;
    std::vector<float> p(E);
    const float mx = *std::max_element(l, l + E);
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - mx));
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
      return p[a] > p[b] || (p[a] == p[b] && a < b);
    });
    float top = 0.0f;
    for (int64_t j = 0; j < k; ++j) top += (wp[t * k + j] = p[order[j]] / sum);
    for (int64_t j = 0; j < k; ++j) {
      ip[t * k + j] = order[j];
      if (renormalize) wp[t * k + j] /= top;
    }
  });
  return {w, ids};
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_f32(gate, "gate");
  check_f32(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate is ", gate.sizes(), ", up is ", up.sizes());
  at::Tensor y = at::empty_like(gate);
  const int64_t I = gate.dim() ? gate.size(-1) : 1, rows = I ? gate.numel() / I : 0;
  const float *gp = gate.data_ptr<float>(), *upp = up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_rows(rows, I * 4, [&](int64_t t) {
    const float *g = gp + t * I, *u = upp + t * I;
    float* o = yp + t * I;
    for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  });
  return y;
}

// q [B, H, D] (one query per sequence); k_rows / v_rows [S, Hkv, D] (a paged cache's flat
// view); slots int64 [M]: sequence b sees the rows slots[offsets[b]:offsets[b + 1]] (in
// position order) -> [B, H, D]: per head h (KV head h / (H / Hkv)), softmax(q_h . k_j * scale)
// over j, then the weighted sum of v_j; fp32 throughout. One (sequence, KV head) is a task, so
// each K / V row is read once for its group of query heads.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_rows,
                            const at::Tensor& v_rows, const at::Tensor& slots,
                            const at::Tensor& offsets, double scale) {
  check_f32(q, "q");
  check_f32(k_rows, "k_rows");
  check_f32(v_rows, "v_rows");
  TORCH_CHECK(q.dim() == 3, "decode_attention takes one query per sequence [B, H, D], got ",
              q.sizes());
  TORCH_CHECK(k_rows.dim() == 3 && v_rows.sizes() == k_rows.sizes() && k_rows.size(2) == q.size(2),
              "k_rows and v_rows must be [slots, Hkv, D] with q's D, got ", k_rows.sizes(), " and ",
              v_rows.sizes());
  for (auto* t : {&slots, &offsets})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 &&
                    t->is_contiguous(),
                "slots and offsets must be contiguous int64 CPU vectors");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_rows.size(1);
  const int64_t S = k_rows.size(0), M = slots.size(0);
  TORCH_CHECK(offsets.size(0) == B + 1, "offsets must have B + 1 = ", B + 1, " entries, got ",
              offsets.size(0));
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, H, " query heads cannot share ", Hkv, " KV heads");
  const int64_t G = H / Hkv;
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[B] == M, "offsets must run from 0 to the ", M, " slots");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(off[b + 1] > off[b], "decode_attention needs at least one key per sequence");
  for (int64_t j = 0; j < M; ++j)
    TORCH_CHECK(sl[j] >= 0 && sl[j] < S, "slot ", sl[j], " is outside the cache's ", S, " rows");
  at::Tensor out = at::zeros({B, H, D}, q.options());
  const float *qall = q.data_ptr<float>(), *kp = k_rows.data_ptr<float>();
  const float* vp = v_rows.data_ptr<float>();
  float* oall = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  auto task = [&](int64_t b, int64_t kv) {
    const int64_t* ss = sl + off[b];
    const int64_t m = off[b + 1] - off[b];
    const float* qp = qall + b * H * D;
    float* op = oall + b * H * D;
    std::vector<float> p(G * m);
    for (int64_t j = 0; j < m; ++j) {
      const float* krow = kp + (ss[j] * Hkv + kv) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qh = qp + (kv * G + g) * D;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= D; i += 8)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(krow + i), acc);
        float dot = hsum8(acc);
        for (; i < D; ++i) dot += qh[i] * krow[i];
        p[g * m + j] = dot * sc;
      }
    }
    std::vector<float> inv(G);
    for (int64_t g = 0; g < G; ++g) {
      float* pg = p.data() + g * m;
      const float mx = *std::max_element(pg, pg + m);
      float sum = 0.0f;
      for (int64_t j = 0; j < m; ++j) sum += (pg[j] = std::exp(pg[j] - mx));
      inv[g] = 1.0f / sum;
    }
    for (int64_t j = 0; j < m; ++j) {
      const float* vrow = vp + (ss[j] * Hkv + kv) * D;
      for (int64_t g = 0; g < G; ++g) {
        float* o = op + (kv * G + g) * D;
        const __m256 w = _mm256_set1_ps(p[g * m + j]);
        int64_t i = 0;
        for (; i + 8 <= D; i += 8)
          _mm256_storeu_ps(o + i, _mm256_fmadd_ps(w, _mm256_loadu_ps(vrow + i),
                                                  _mm256_loadu_ps(o + i)));
        for (; i < D; ++i) o[i] += p[g * m + j] * vrow[i];
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* o = op + (kv * G + g) * D;
      for (int64_t i = 0; i < D; ++i) o[i] *= inv[g];
    }
  };
  const int64_t tasks = B * Hkv;
  if (M * H * D < PAR_MIN_ELEMS || tasks < 2) {
    for (int64_t t = 0; t < tasks; ++t) task(t / Hkv, t % Hkv);
  } else {
    at::parallel_for(0, tasks, 1, [&](int64_t a, int64_t e) {
      for (int64_t t = a; t < e; ++t) task(t / Hkv, t % Hkv);
    });
  }
  return out;
}

void kv_store_(const at::Tensor& k_rows, const at::Tensor& v_rows, const at::Tensor& slots,
               const at::Tensor& k, const at::Tensor& v) {
  for (auto* t : {&k_rows, &v_rows, &k, &v}) check_f32(*t, "k_rows, v_rows, k and v");
  TORCH_CHECK(slots.device().is_cpu() && slots.scalar_type() == at::kLong && slots.dim() == 1 &&
                  slots.is_contiguous(),
              "slots must be a contiguous int64 CPU vector");
  TORCH_CHECK(k_rows.dim() == 3 && v_rows.sizes() == k_rows.sizes(), "k_rows and v_rows must be "
              "[slots, Hkv, D] of one shape");
  const int64_t n = slots.size(0), S = k_rows.size(0), row = k_rows.size(1) * k_rows.size(2);
  TORCH_CHECK(k.numel() == n * row && v.numel() == n * row, "k and v must hold ", n, " rows of ",
              row, " values");
  const int64_t* sl = slots.data_ptr<int64_t>();
  float *kd = k_rows.data_ptr<float>(), *vd = v_rows.data_ptr<float>();
  const float *ks = k.data_ptr<float>(), *vs = v.data_ptr<float>();
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(sl[j] >= 0 && sl[j] < S, "slot ", sl[j], " is outside the cache's ", S, " rows");
    std::memcpy(kd + sl[j] * row, ks + j * row, row * sizeof(float));
    std::memcpy(vd + sl[j] * row, vs + j * row, row * sizeof(float));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(inference_pio, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()",
        &add_rms_norm_);
  m.def("qk_norm_rope_(Tensor(a!) q, Tensor(b!) k, Tensor q_weight, Tensor k_weight, "
        "Tensor cos, Tensor sin, float eps) -> ()",
        &qk_norm_rope_);
  m.def("route_topk(Tensor logits, int k, bool renormalize) -> (Tensor, Tensor)", &route_topk);
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor", &silu_mul);
  m.def("decode_attention(Tensor q, Tensor k_rows, Tensor v_rows, Tensor slots, Tensor offsets, "
        "float scale) -> Tensor", &decode_attention);
  m.def("kv_store_(Tensor(a!) k_rows, Tensor(b!) v_rows, Tensor slots, Tensor k, Tensor v) -> ()",
        &kv_store_);
}
