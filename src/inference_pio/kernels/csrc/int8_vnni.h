// int8 x Q8 dot products with AVX-512 VNNI, for CPUs that have AVX-512 F/BW/VL and VNNI.
// Included by cpu_quant.cpp after the Int8Mat definitions, only when those instruction sets are
// enabled; int4_vnni.h provides the 16-row transposition (transpose16, kLaneRow), the rows
// driver (rows_vnni) and load_i32.
//
// A tile is 16 rows; for each 32-column block (one activation block) the 16 rows' 32 bytes are
// transposed in registers into 8 vectors, one per 4-byte column group, as in int4_vnni.h.
// vpdpbusd multiplies an unsigned operand by a signed one, so the weights go in shifted to
// unsigned (w ^ 0x80 = w + 128, once per block for all tokens) against the token's codes
// broadcast from memory: acc = sum (w + 128) q = sum w q + 128 s, s = the block's code sum
// (Q8::s), taken off in integers before the conversion, so the block's integer dot product is
// exact, as in the AVX2 kernel. Per block and token: f += float(acc - 128 s) * d; the row scales
// multiply f at the end. A partial last block is read with a byte mask (the codes past the
// columns are zero).

// 16 rows [r0, r0 + 16) for NT tokens: y[t * ldy + r0 + i]; `next` as in int4_tile16.
template <int NT>
inline void int8_tile16(const Int8Mat& W, int64_t r0, const Q8& a, const int32_t* tok, float* y,
                        int64_t ldy, const char* next) {
  const int64_t cols = W.cols, nblk = (cols + QK - 1) / QK;
  const int8_t* w = W.qrow(r0);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* x[NT];
  const float* xd[NT];
  const float* xs[NT];
  __m512 f[NT];
  for (int t = 0; t < NT; ++t) {
    x[t] = a.qrow(tok[t]);
    xd[t] = a.drow(tok[t]);
    xs[t] = a.srow(tok[t]);
    f[t] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < nblk; ++b) {
    const int8_t* wb = w + QK * b;
    const int64_t valid = std::min<int64_t>(QK, cols - QK * b);
    const __mmask32 m = valid == QK ? ~__mmask32{0} : ((__mmask32{1} << valid) - 1);
    if (next != nullptr)  // the next tile: 16 * cols bytes, 512 a block
      for (int l = 0; l < 8; ++l) _mm_prefetch(next + 512 * b + 64 * l, _MM_HINT_T0);
    __m512i X[8];
    if (W.packed) {  // the tile stored transposed: block b is X[0..7], 64 bytes each
      const int8_t* xb = w + 512 * b;
      for (int j = 0; j < 8; ++j) X[j] = _mm512_loadu_si512(xb + 64 * j);
    } else {
      transpose16(reinterpret_cast<const uint8_t*>(wb), cols, m, X);
    }
    __m512i acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j) {
      const __m512i wu = _mm512_xor_si512(X[j], flip);  // w + 128, unsigned
      for (int t = 0; t < NT; ++t)
        acc[t] = _mm512_dpbusd_epi32(acc[t], wu,
                                     _mm512_set1_epi32(load_i32(x[t] + QK * b + 4 * j)));
    }
    for (int t = 0; t < NT; ++t) {
      const __m512i dot = _mm512_sub_epi32(
          acc[t], _mm512_set1_epi32(128 * static_cast<int32_t>(xs[t][b])));
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xd[t][b]), f[t]);
    }
  }
  const __m512i order = _mm512_loadu_si512(kLaneRow);
  const __m512 scale = _mm512_loadu_ps(W.s + r0);
  for (int t = 0; t < NT; ++t)
    _mm512_storeu_ps(y + t * ldy + r0, _mm512_mul_ps(_mm512_permutexvar_ps(order, f[t]), scale));
}

// int8_rows with whole 16-row tiles on VNNI; the rows past the last whole tile on AVX2.
void int8_rows_vnni(const Int8Mat& W, int64_t r0, int64_t r1, const Q8& a, const int32_t* tok,
                    int64_t T, float* y, int64_t ldy, float* scratch, const void* after) {
  rows_vnni(
      W, r0, r1, tok, T, y, ldy, after,
      [&](int nt, int64_t r, const int32_t* tk, float* yt, const char* next) {
        with_nt(nt, [&](auto n) {
          int8_tile16<decltype(n)::value>(W, r, a, tk, yt, ldy, next);
        });
      },
      [&](int64_t from, int64_t to) { int8_rows(W, from, to, a, tok, T, y, ldy, scratch); });
}
