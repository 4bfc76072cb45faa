/*
 * Vector intrinsics in portable C for the CPU kernels' emulated test builds
 * (tests/kernel_builds.py): compiled with -DMLCV_X86_EMULATION='"x86_emulation.h"',
 * the kernels take their AVX, AVX2, AVX-512 and AVX512-BF16 intrinsics from SIMDe (Debian's
 * libsimde-dev) and their AMX ones from the tile model below, so every vector path runs on any
 * x86-64 CPU. Slow, and only as exact as these models: a check of the code paths' logic (packing,
 * tails, masks, epilogues), not of the hardware's rounding.
 *
 * What SIMDe 0.7 lacks (or gets wrong) and the kernels use is written here after the instructions'
 * definitions in Intel's manual, replacing any SIMDe form of the same name.
 */
#ifndef MLCV_TESTS_X86_EMULATION_H_
#define MLCV_TESTS_X86_EMULATION_H_

#include <stdint.h>
#include <string.h>
#include <xmmintrin.h> /* _mm_prefetch: SSE, native on every x86-64 CPU */

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

/* What SIMDe's aliases leave out. */
typedef simde__mmask8 __mmask8;
typedef simde__mmask16 __mmask16;
typedef simde__mmask32 __mmask32;
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif

/* ------------------------------------------------------------------ masked moves */

static inline __m512 emu_mm512_maskz_loadu_ps(__mmask16 k, const void* p) {
  float v[16] = {0};
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) memcpy(&v[i], (const float*)p + i, 4);
  return _mm512_loadu_ps(v);
}

static inline __m512i emu_mm512_maskz_loadu_epi32(__mmask16 k, const void* p) {
  int32_t v[16] = {0};
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) memcpy(&v[i], (const int32_t*)p + i, 4);
  return _mm512_loadu_si512(v);
}

static inline void emu_mm512_mask_storeu_ps(void* p, __mmask16 k, __m512 a) {
  float v[16];
  _mm512_storeu_ps(v, a);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) memcpy((float*)p + i, &v[i], 4);
}

static inline __m256i emu_mm256_maskz_loadu_epi16(__mmask16 k, const void* p) {
  uint16_t v[16] = {0};
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) memcpy(&v[i], (const uint16_t*)p + i, 2);
  return _mm256_loadu_si256((const __m256i*)v);
}

static inline void emu_mm256_mask_storeu_epi16(void* p, __mmask16 k, __m256i a) {
  uint16_t v[16];
  _mm256_storeu_si256((__m256i*)v, a);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) memcpy((uint16_t*)p + i, &v[i], 2);
}

#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps emu_mm512_maskz_loadu_ps
#undef _mm512_maskz_loadu_epi32
#define _mm512_maskz_loadu_epi32 emu_mm512_maskz_loadu_epi32
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps emu_mm512_mask_storeu_ps
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16 emu_mm256_maskz_loadu_epi16
#undef _mm256_mask_storeu_epi16
#define _mm256_mask_storeu_epi16 emu_mm256_mask_storeu_epi16

/* ------------------------------------------------------------------ tests of 256 bits */

/* SIMDe 0.7.4's vptest forms read only part of the vector (a mask of one or two low lanes tests as
 * zero), so both are written here over all 32 bytes. */
static inline int emu_mm256_testz_si256(__m256i a, __m256i b) {
  uint8_t x[32], y[32];
  int any = 0;
  _mm256_storeu_si256((__m256i*)x, a);
  _mm256_storeu_si256((__m256i*)y, b);
  for (int i = 0; i < 32; ++i) any |= x[i] & y[i];
  return any == 0;
}

static inline int emu_mm256_testc_si256(__m256i a, __m256i b) {
  uint8_t x[32], y[32];
  int any = 0;
  _mm256_storeu_si256((__m256i*)x, a);
  _mm256_storeu_si256((__m256i*)y, b);
  for (int i = 0; i < 32; ++i) any |= ~x[i] & y[i];
  return any == 0;
}

#undef _mm256_testz_si256
#define _mm256_testz_si256 emu_mm256_testz_si256
#undef _mm256_testc_si256
#define _mm256_testc_si256 emu_mm256_testc_si256

/* ------------------------------------------------------------------ arithmetic */

static inline __m512i emu_mm512_cvtepu16_epi32(__m256i a) {
  uint16_t in[16];
  uint32_t out[16];
  _mm256_storeu_si256((__m256i*)in, a);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return _mm512_loadu_si512(out);
}

/* vrcp14ps: an estimate within 2^-14; the exact reciprocal is one. */
static inline __m512 emu_mm512_rcp14_ps(__m512 a) { return _mm512_div_ps(_mm512_set1_ps(1.0f), a); }

static inline float emu_mm512_reduce_add_ps(__m512 a) {
  float v[16], sum = 0.0f;
  _mm512_storeu_ps(v, a);
  for (int i = 0; i < 16; ++i) sum += v[i];
  return sum;
}

static inline float emu_mm512_reduce_max_ps(__m512 a) {
  float v[16], most;
  _mm512_storeu_ps(v, a);
  most = v[0];
  for (int i = 1; i < 16; ++i) most = v[i] > most ? v[i] : most;
  return most;
}

#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 emu_mm512_cvtepu16_epi32
#undef _mm512_rcp14_ps
#define _mm512_rcp14_ps emu_mm512_rcp14_ps
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps emu_mm512_reduce_add_ps
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps emu_mm512_reduce_max_ps

/* ------------------------------------------------------------------ bf16 conversions */

/* vcvtneps2bf16 on one value: round to nearest even, denormals to signed zero, NaN kept quiet. */
static inline uint16_t emu_bf16_of(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return (uint16_t)(u >> 16 | 0x40);
  if ((u & 0x7f800000u) == 0) return (uint16_t)(u >> 16 & 0x8000);
  return (uint16_t)((u + 0x7fffu + (u >> 16 & 1)) >> 16);
}

static inline __m256bh emu_mm512_cvtneps_pbh(__m512 a) {
  float in[16];
  uint16_t out[16];
  __m256bh r;
  _mm512_storeu_ps(in, a);
  for (int i = 0; i < 16; ++i) out[i] = emu_bf16_of(in[i]);
  memcpy(&r, out, sizeof(r));
  return r;
}

/* The low 16 bf16 words from b, the high 16 from a. */
static inline __m512bh emu_mm512_cvtne2ps_pbh(__m512 a, __m512 b) {
  float lo[16], hi[16];
  uint16_t out[32];
  __m512bh r;
  _mm512_storeu_ps(lo, b);
  _mm512_storeu_ps(hi, a);
  for (int i = 0; i < 16; ++i) {
    out[i] = emu_bf16_of(lo[i]);
    out[16 + i] = emu_bf16_of(hi[i]);
  }
  memcpy(&r, out, sizeof(r));
  return r;
}

#undef _mm512_cvtneps_pbh
#define _mm512_cvtneps_pbh emu_mm512_cvtneps_pbh
#undef _mm512_cvtne2ps_pbh
#define _mm512_cvtne2ps_pbh emu_mm512_cvtne2ps_pbh

/* ------------------------------------------------------------------ AMX */

/* The eight tile registers of the calling thread and their shapes (palette 1: at most 16 rows of
 * 64 bytes), as _tile_loadconfig sets them. */
typedef struct {
  uint8_t rows[8];
  uint16_t colsb[8];
  uint8_t data[8][16][64];
} emu_amx_state;

static __thread emu_amx_state emu_amx;

static inline void emu_tile_loadconfig(const void* config) {
  const uint8_t* c = (const uint8_t*)config; /* palette, start row, 14 reserved, colsb[16], rows[16] */
  memset(&emu_amx, 0, sizeof(emu_amx));
  for (int t = 0; t < 8; ++t) {
    memcpy(&emu_amx.colsb[t], c + 16 + 2 * t, 2);
    emu_amx.rows[t] = c[48 + t];
  }
}

static inline void emu_tile_loadd(int t, const void* base, int64_t stride) {
  memset(emu_amx.data[t], 0, sizeof(emu_amx.data[t]));
  for (int r = 0; r < emu_amx.rows[t]; ++r) memcpy(emu_amx.data[t][r], (const uint8_t*)base + r * stride, emu_amx.colsb[t]);
}

static inline void emu_tile_stored(int t, void* base, int64_t stride) {
  for (int r = 0; r < emu_amx.rows[t]; ++r) memcpy((uint8_t*)base + r * stride, emu_amx.data[t][r], emu_amx.colsb[t]);
}

static inline void emu_tile_zero(int t) { memset(emu_amx.data[t], 0, sizeof(emu_amx.data[t])); }

static inline float emu_bf16_word(const uint8_t* p) {
  uint32_t u = (uint32_t)(p[0] | p[1] << 8) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* tdpbf16ps: c[m][n] += sum over k of a[m][2k] b[k][2n] + a[m][2k + 1] b[k][2n + 1], with a's rows of
 * bf16 pairs and b's rows the k pairs of c's columns. */
static inline void emu_tile_dpbf16ps(int c, int a, int b) {
  for (int m = 0; m < emu_amx.rows[c]; ++m)
    for (int n = 0; n < emu_amx.colsb[c] / 4; ++n) {
      float acc;
      memcpy(&acc, emu_amx.data[c][m] + 4 * n, 4);
      for (int k = 0; k < emu_amx.colsb[a] / 4; ++k) {
        acc += emu_bf16_word(emu_amx.data[a][m] + 4 * k) * emu_bf16_word(emu_amx.data[b][k] + 4 * n);
        acc += emu_bf16_word(emu_amx.data[a][m] + 4 * k + 2) * emu_bf16_word(emu_amx.data[b][k] + 4 * n + 2);
      }
      memcpy(emu_amx.data[c][m] + 4 * n, &acc, 4);
    }
}

static inline void emu_tile_release(void) { memset(&emu_amx, 0, sizeof(emu_amx)); }

#undef _tile_loadconfig
#define _tile_loadconfig emu_tile_loadconfig
#undef _tile_loadd
#define _tile_loadd emu_tile_loadd
#undef _tile_stored
#define _tile_stored emu_tile_stored
#undef _tile_zero
#define _tile_zero emu_tile_zero
#undef _tile_dpbf16ps
#define _tile_dpbf16ps emu_tile_dpbf16ps
#undef _tile_release
#define _tile_release emu_tile_release

#endif /* MLCV_TESTS_X86_EMULATION_H_ */
