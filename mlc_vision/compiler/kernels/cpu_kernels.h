/*
 * What the CPU kernels (cpu_f32_gemm.c, cpu_bf16_gemm.c, cpu_segment_attention.c) share: the x86
 * switch, the target attribute of a path (MLCV_TARGET) and its emulated test build, the OS checks for
 * the AVX and AVX-512 register states, 8 x 8 and 16 x 16 transposes of 32-bit words, and grow-only
 * scratch buffers per thread.
 */
#ifndef MLCV_CPU_KERNELS_H_
#define MLCV_CPU_KERNELS_H_

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__)
#include <cpuid.h>
#define MLCV_X86 1
#else
#define MLCV_X86 0
#endif

/* MLCV_X86_EMULATION (tests only, tests/kernel_builds.py) names a header that supplies
 * the vector intrinsics in portable C: the vector functions are then compiled without their target
 * features and the feature probes report every path present, so that the AVX-512, AVX512-BF16 and
 * AMX paths run, slowly, on any x86-64 CPU. Products never set it. */
#if MLCV_X86 && defined(MLCV_X86_EMULATION)
#include MLCV_X86_EMULATION
#define MLCV_EMULATED 1
#define MLCV_TARGET(features)
#else
#if MLCV_X86
#include <immintrin.h>
#endif
#define MLCV_EMULATED 0
#define MLCV_TARGET(features) __attribute__((target(features)))
#endif

#include "tvm_thread_pool.h" /* found beside this file */

#if MLCV_X86
/* XCR0: the register states the OS saves on a context switch. */
static inline uint64_t mlcv_xgetbv0(void) {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return ((uint64_t)edx << 32) | eax;
}

/* Whether the OS saves the AVX-512 state (SSE, AVX, opmask and both ZMM halves): cpuid's feature
 * bits say what the CPU has, not what the OS lets a process use. */
static inline int mlcv_os_saves_avx512(void) {
  uint32_t a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE */
  return (mlcv_xgetbv0() & 0xe6) == 0xe6;
}

/* Whether the OS saves the AVX state (SSE and the upper YMM halves). */
static inline int mlcv_os_saves_avx(void) {
  uint32_t a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE */
  return (mlcv_xgetbv0() & 0x6) == 0x6;
}

/* 8 x 8 transpose of fp32: r[i][j] -> r[j][i]. */
MLCV_TARGET("avx") __attribute__((always_inline)) static inline void mlcv_transpose8x8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  /* Each 128-bit lane now holds a 4 x 4 block; gather the lanes. */
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

/* 16 x 16 transpose of 32-bit words: r[i][j] -> r[j][i]. */
MLCV_TARGET("avx512f") __attribute__((always_inline)) static inline void mlcv_transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  /* Each 128-bit lane now holds a 4 x 4 block; gather the lanes. */
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}
#endif

/* A grow-only buffer, declared ``static __thread``: each pool thread keeps its own for the next call. */
typedef struct {
  void* data;
  size_t bytes;
} mlcv_scratch;

/* ``scratch``'s buffer with room for at least ``bytes`` (64-byte aligned), or NULL when out of memory. */
static inline void* mlcv_scratch_reserve(mlcv_scratch* scratch, size_t bytes) {
  if (bytes > scratch->bytes) {
    free(scratch->data);
    scratch->data = NULL;
    scratch->bytes = 0;
    if (posix_memalign(&scratch->data, 64, bytes) != 0) return NULL;
    scratch->bytes = bytes;
  }
  return scratch->data;
}

#endif /* MLCV_CPU_KERNELS_H_ */
