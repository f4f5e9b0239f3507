// int4 x Q8 dot products with AVX-512 VNNI (vpdpbusd), for CPUs that have AVX-512 F/BW/VL and
// VNNI (Intel Cascade Lake and later, AMD Zen 4 and later). Included by cpu_quant.cpp inside its
// namespace, after the Int4Mat / Q8 definitions, only when those instruction sets are enabled
// (kernels/cpu.py adds the flags when the CPU reports them). Same weight layout and activation
// quantization as the AVX2 kernel; only the order of the float additions differs.
//
// A tile is 16 rows. For each 64-column block, the 16 rows' 32 bytes are transposed in
// registers (vinserti64x4, vpunpck{l,h}dq, vpunpck{l,h}qdq, vshufi64x2: 32 shuffles) into 8
// vectors, one per 4-byte column group j = 0..7, each holding group j of all 16 rows (lane i
// holds row kLaneRow[i]). Low nibbles (columns 4j..4j+3 of the block) and high nibbles times 16
// (byte & 0xF0: columns 32+4j..) multiply the token's 4 codes of those columns, broadcast from
// memory: vpdpbusd (u8 x s8, four products per int32 lane). Nothing is summed across lanes, so
// one 16-lane float accumulator per token holds the tile's 16 rows. Per block and token, with
// Q8::v's constants:
//   f += (cvt(acc_lo) * d_lo - 8 s_lo d_lo) * w_lo + (cvt(acc_hi) * d_hi / 16 - 8 s_hi d_hi) * w_hi
// where w_lo, w_hi are the rows' fp16 scales of the block's two 32-column halves (gathered, two
// groups per gather). |acc_hi| <= 32 * 240 * 128 < 2^24, so the int32 -> float conversions are
// exact, and d_hi / 16 is exact (a power of two).
//
// Cost per 16 rows x 64 columns: 16 loads, 32 shuffles, 16 ands shared by the tokens of the
// tile (up to 4), then 16 vpdpbusd and 6 float operations per token: about 15 columns x rows
// per instruction at one token, against ~9 for the AVX2 kernel's pairs of rows.

constexpr int64_t VNNI_ROWS = 16;
// kLaneRow (cpu_quant.cpp): tile lane i holds row kLaneRow[i].

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The 32 bytes at p + k * stride of rows k = 0..15 (bytes past `m` read as zero) transposed into
// X[j] = bytes 4j..4j+3 of all 16 rows, lane i holding row kLaneRow[i].
inline void transpose16(const uint8_t* p, int64_t stride, __mmask32 m, __m512i (&X)[8]) {
  __m512i A[8];
  for (int k = 0; k < 8; ++k) {
    const __m256i lo = _mm256_maskz_loadu_epi8(m, p + k * stride);
    const __m256i hi = _mm256_maskz_loadu_epi8(m, p + (k + 8) * stride);
    A[k] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // rows k | k + 8
  }
  __m512i U[8];
  for (int k = 0; k < 4; ++k) {
    U[2 * k] = _mm512_unpacklo_epi32(A[2 * k], A[2 * k + 1]);
    U[2 * k + 1] = _mm512_unpackhi_epi32(A[2 * k], A[2 * k + 1]);
  }
  // per h: 128-bit lanes = rows (4h..4h+3) dword q, (4h..) dword q+4, (8+4h..) q, (8+4h..) q+4
  for (int h = 0; h < 2; ++h) {
    const __m512i* u = U + 4 * h;
    const __m512i va[4] = {_mm512_unpacklo_epi64(u[0], u[2]), _mm512_unpackhi_epi64(u[0], u[2]),
                           _mm512_unpacklo_epi64(u[1], u[3]), _mm512_unpackhi_epi64(u[1], u[3])};
    for (int q = 0; q < 4; ++q) {
      if (h == 0) {
        X[q] = va[q];
      } else {  // rows 0-3, 8-11, 4-7, 12-15 of column group q, then of q + 4
        X[q + 4] = _mm512_shuffle_i64x2(X[q], va[q], _MM_SHUFFLE(3, 1, 3, 1));
        X[q] = _mm512_shuffle_i64x2(X[q], va[q], _MM_SHUFFLE(2, 0, 2, 0));
      }
    }
  }
}

// Rows [r0, r1) of W for T tokens: whole 16-row tiles through tile(nt, r, tok, y, next) (up to
// MAX_NT tokens a call, tokens in blocks of TOKEN_BLOCK; `next`: the weights read after the
// tile, prefetched on its last pass: the next tile, or `after` past the last one), the rest
// through tail(r, r1).
template <class Mat, class Tile, class Tail>
void rows_vnni(const Mat& W, int64_t r0, int64_t r1, const int32_t* tok, int64_t T, float* y,
               int64_t ldy, const void* after, Tile&& tile, Tail&& tail) {
  const int64_t tiles_end = r0 + (r1 - r0) / VNNI_ROWS * VNNI_ROWS;
  for (int64_t tb = 0; tb < T; tb += TOKEN_BLOCK) {
    const int64_t te = std::min(T, tb + TOKEN_BLOCK);
    for (int64_t r = r0; r < tiles_end; r += VNNI_ROWS) {
      for (int64_t t = tb; t < te; t += MAX_NT) {
        // prefetch on the last pass over the tile only (the weights are in L1 on the others)
        const bool last_pass = t + MAX_NT >= te;
        const char* next = !last_pass ? nullptr
                           : r + VNNI_ROWS < tiles_end
                               ? reinterpret_cast<const char*>(W.qrow(r + VNNI_ROWS))
                               : (te == T ? static_cast<const char*>(after) : nullptr);
        tile(static_cast<int>(std::min(MAX_NT, te - t)), r, tok + t, y + t * ldy, next);
      }
    }
  }
  if (tiles_end < r1) tail(tiles_end, r1);
}

// The scales of group g for the tile's 16 rows (lane order kLaneRow), as fp32. `pair` caches the
// last gather (two fp16 groups per int32 lane) and `pair_at` the group it starts at.
inline __m512 tile_scales(const Int4Mat& W, const at::Half* s0, __m512i offs, int64_t g,
                          int64_t& pair_at, __m512i& pair) {
  if (W.ngroups == 1) {  // one group per row: a 4-byte gather would read past the last row
    alignas(64) float v[16];
    for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(s0[kLaneRow[i] * W.ngroups]);
    return _mm512_load_ps(v);
  }
  // the pair (at, at + 1) holding g; the last group of an odd count pairs with the one before
  const int64_t at = g + 1 < W.ngroups ? g & ~int64_t{1} : g - 1;
  if (at != pair_at) {
    pair = _mm512_i32gather_epi32(offs, static_cast<const void*>(s0 + at), 1);
    pair_at = at;
  }
  const __m512i h = g == at ? pair : _mm512_srli_epi32(pair, 16);
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
}

// 16 rows [r0, r0 + 16) for NT tokens: y[t * ldy + r0 + i]. `next`: the 16 * cols_p / 2 bytes
// of weights to be read after these (the next tile), fetched into the cache meanwhile, as a
// stream of 512 bytes a block (nullptr: none).
template <int NT>
inline void int4_tile16(const Int4Mat& W, int64_t r0, const Q8& a, const int32_t* tok, float* y,
                        int64_t ldy, const char* next) {
  const int64_t nblk = W.cols_p / PACK, rb = W.cols_p / 2;
  const uint8_t* w = W.qrow(r0);
  const at::Half* s0 = W.srow(r0);
  const __m512i m_lo = _mm512_set1_epi8(0x0F), m_hi = _mm512_set1_epi8(static_cast<char>(0xF0));
  alignas(64) int32_t off_rows[16];
  for (int i = 0; i < 16; ++i) off_rows[i] = static_cast<int32_t>(kLaneRow[i] * W.ngroups * 2);
  const __m512i offs = _mm512_load_si512(off_rows);
  const int8_t* x[NT];
  const float* v[NT];
  __m512 f[NT];
  for (int t = 0; t < NT; ++t) {
    x[t] = a.qrow(tok[t]);
    v[t] = a.vrow(tok[t]);
    f[t] = _mm512_setzero_ps();
  }
  int64_t pair_at = -1;
  __m512i pair = _mm512_setzero_si512();
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* wb = w + 32 * b;
    if (next != nullptr)
      for (int l = 0; l < 8; ++l) _mm_prefetch(next + 512 * b + 64 * l, _MM_HINT_T0);
    __m512i X[8];
    if (W.packed) {  // the tile stored transposed: block b is X[0..7], 64 bytes each
      const uint8_t* xb = w + 512 * b;
      for (int j = 0; j < 8; ++j) X[j] = _mm512_loadu_si512(xb + 64 * j);
    } else {
      transpose16(wb, rb, ~__mmask32{0}, X);
    }
    __m512i acc_lo[NT], acc_hi[NT];
    for (int t = 0; t < NT; ++t) acc_lo[t] = acc_hi[t] = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j) {
      const __m512i lo = _mm512_and_si512(X[j], m_lo), hi = _mm512_and_si512(X[j], m_hi);
      for (int t = 0; t < NT; ++t) {
        const int8_t* xb = x[t] + 64 * b + 4 * j;
        acc_lo[t] = _mm512_dpbusd_epi32(acc_lo[t], lo, _mm512_set1_epi32(load_i32(xb)));
        acc_hi[t] = _mm512_dpbusd_epi32(acc_hi[t], hi, _mm512_set1_epi32(load_i32(xb + 32)));
      }
    }
    const __m512 w_lo = tile_scales(W, s0, offs, (2 * b) >> W.shift, pair_at, pair);
    const __m512 w_hi = tile_scales(W, s0, offs, (2 * b + 1) >> W.shift, pair_at, pair);
    for (int t = 0; t < NT; ++t) {
      const float* c = v[t] + 4 * b;
      const __m512 tl = _mm512_fmsub_ps(_mm512_cvtepi32_ps(acc_lo[t]), _mm512_set1_ps(c[0]),
                                        _mm512_set1_ps(c[2]));
      const __m512 th = _mm512_fmsub_ps(_mm512_cvtepi32_ps(acc_hi[t]), _mm512_set1_ps(c[1]),
                                        _mm512_set1_ps(c[3]));
      f[t] = _mm512_fmadd_ps(th, w_hi, _mm512_fmadd_ps(tl, w_lo, f[t]));
    }
  }
  const __m512i order = _mm512_loadu_si512(kLaneRow);  // self-inverse: lane i <-> row kLaneRow[i]
  for (int t = 0; t < NT; ++t)
    _mm512_storeu_ps(y + t * ldy + r0, _mm512_permutexvar_ps(order, f[t]));
}

// int4_rows with whole 16-row tiles on VNNI; the rows past the last whole tile on AVX2.
// `after`: the weights the caller reads next (prefetched during the last tile), or nullptr.
void int4_rows_vnni(const Int4Mat& W, int64_t r0, int64_t r1, const Q8& a, const int32_t* tok,
                    int64_t T, float* y, int64_t ldy, float* dd, const void* after) {
  rows_vnni(
      W, r0, r1, tok, T, y, ldy, after,
      [&](int nt, int64_t r, const int32_t* tk, float* yt, const char* next) {
        with_nt(nt, [&](auto n) {
          int4_tile16<decltype(n)::value>(W, r, a, tk, yt, ldy, next);
        });
      },
      [&](int64_t from, int64_t to) { int4_rows(W, from, to, a, tok, T, y, ldy, dd); });
}
