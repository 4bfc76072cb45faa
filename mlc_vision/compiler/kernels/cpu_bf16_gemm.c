/*
 * bf16 x bf16 -> fp32 linear layer for CPU libraries: y[M, N] = x[M, K] . w[N, K]^T (+ bias[N]),
 * and attention on the same register tile.
 *
 * x and w are bf16 (their raw 16-bit words), y and bias fp32; products are
 * accumulated in fp32. The path is chosen at run time from the CPU's features:
 *
 *   AMX       tdpbf16ps on 16 x 16 fp32 tiles (Intel Sapphire Rapids and later);
 *   AVX512    vdpbf16ps, a 6 x 64 register tile (AVX512-BF16: AMD Zen 4/5,
 *             Intel Cooper Lake and later);
 *   GENERIC   plain C (bf16 -> fp32, fp32 multiply-add): any x86-64 or other CPU.
 *
 * Work is split over TVM's thread pool (TVMBackendParallelLaunch) into units
 * that the threads take one at a time (an atomic counter: a thread the OS
 * delays takes fewer).
 *
 * AVX512 and plain C: units are (panel of NR output columns) x (block of rows).
 * A thread packs the bf16 weights of a panel once for the units of that panel
 * it takes in a row, pair-interleaved along k:
 *
 *   panel[kp][c] = (w[n0 + c][2 kp], w[n0 + c][2 kp + 1])   (one 32-bit word)
 *
 * which is the operand layout of vdpbf16ps (16 columns x 2 k per zmm); the
 * packing is a 16 x 16 transpose of 32-bit words in registers (16 weight rows
 * read 64 bytes at a time). x needs no packing: a pair of consecutive x values
 * is one 32-bit broadcast. K must be even (the compiler pass only offers even K).
 *
 * AMX (the section "AMX linear layer"): y^T = w . x^T with the weights as the
 * A operand, read in place from w[N, K] (no weight packing); x is packed once
 * per call into the B layout, and each 16 x 16 fp32 result tile is transposed
 * in registers before the epilogue. Blocking follows the L1 and L2 sizes the
 * OS reports.
 *
 * The store (the epilogue) adds a bias and a residual and can apply an
 * activation (quick GELU, GELU with erf or tanh) and round the result to bf16,
 * the next linear layer's input. The same tiles also run bf16 libraries'
 * attention (the section at the end of the file).
 *
 * Compiled with the host C compiler at export (cpu_bf16_gemm.py) and
 * linked into the library; the instruction sets are enabled per function, so
 * the object runs on any x86-64 CPU and uses what it finds.
 */

#include <math.h>
#include <string.h>
#include <unistd.h>

#include "cpu_kernels.h" /* found beside this file */

#if MLCV_X86
#include <sys/syscall.h>
#endif

enum { PATH_GENERIC = 0, PATH_AVX512 = 1, PATH_AMX = 2 };

#define NR 64         /* output columns per panel: 4 zmm of 16 fp32 */
#define MR 6          /* rows of the AVX512 register tile: 6 x 4 = 24 zmm accumulators */
#define AMX_ROWS 32   /* rows of the AMX block: 2 x 2 tiles of 16 x 16 */
#define AMX_K 32      /* bf16 k per AMX tile step (64 bytes per row) */

/* ------------------------------------------------------------------ features */

#if MLCV_X86
/* AMX registers are off until the process asks Linux for them (arch_prctl
 * ARCH_REQ_XCOMP_PERM for XTILEDATA); without it the first tile load faults. */
static int request_amx_permission(void) {
#if defined(__linux__)
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
  return 0;
#endif
}
#endif

/* Whether ``path`` can run on this CPU (and OS), asked of the CPU (cpuid, xgetbv); every path in an
 * emulated test build (cpu_kernels.h). */
static int probe_path(int path) {
  if (path == PATH_GENERIC) return 1;
#if MLCV_X86
  uint32_t a, b, c, d;
  if (MLCV_EMULATED) return 1;
  if (!mlcv_os_saves_avx512()) return 0;
  __cpuid_count(7, 0, a, b, c, d);
  int avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31)); /* F, BW, VL */
  int amx = (d & (1u << 22)) && (d & (1u << 24));                          /* AMX-BF16, AMX-TILE */
  uint32_t max_sub = a;
  int bf16 = 0;
  if (max_sub >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    bf16 = (a & (1u << 5)) != 0; /* AVX512_BF16 */
  }
  if (path == PATH_AVX512) return avx512 && bf16;
  /* The AMX path does its row tails with the AVX512 kernel. */
  if (path == PATH_AMX) return avx512 && bf16 && amx && request_amx_permission() && ((mlcv_xgetbv0() >> 17) & 3) == 3;
#endif
  return 0;
}

static int path_supported[3] = {-1, -1, -1};

/* Whether ``path`` (0 generic, 1 AVX512-BF16, 2 AMX) can run here; probed once per path. */
int mlcv_bf16_path_supported(int path) {
  if (path < 0 || path > PATH_AMX) return 0;
  int known = __atomic_load_n(&path_supported[path], __ATOMIC_RELAXED);
  if (known < 0) {
    known = probe_path(path);
    __atomic_store_n(&path_supported[path], known, __ATOMIC_RELAXED);
  }
  return known;
}

static int detected_path = -1;

/* The fastest path this CPU runs (detected once). */
int mlcv_bf16_best_path(void) {
  int path = __atomic_load_n(&detected_path, __ATOMIC_RELAXED);
  if (path < 0) {
    path = mlcv_bf16_path_supported(PATH_AMX) ? PATH_AMX
           : mlcv_bf16_path_supported(PATH_AVX512) ? PATH_AVX512
                                                    : PATH_GENERIC;
    __atomic_store_n(&detected_path, path, __ATOMIC_RELAXED);
  }
  return path;
}

/* ------------------------------------------------------------------ helpers */

static int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

static inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* Activations the epilogue can apply (``ACTIVATIONS`` in cpu_bf16_gemm.py has the same numbers). */
enum { ACT_NONE = 0, ACT_QUICK_GELU = 1, ACT_GELU_ERF = 2, ACT_GELU_TANH = 3 };

/* What happens to x . w^T before the store: a bias vector [N] and a residual [M, N] are added (each
 * optional), then ``act`` is applied. The result goes to ``y`` (fp32) or, when ``y16`` is set, is
 * rounded to bf16 (nearest even) into ``y16``: the next linear layer's input, without an fp32
 * round trip through memory. */
typedef struct {
  const float* bias;
  const float* residual;
  int act;
  uint16_t* y16;
} epilogue;

static inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays a quiet NaN */
  return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline float activation_scalar(int act, float v) {
  switch (act) {
    case ACT_QUICK_GELU: return v / (1.0f + expf(-1.702f * v));
    case ACT_GELU_ERF: return 0.5f * v * (1.0f + erff(v * 0.70710678f));
    case ACT_GELU_TANH: return 0.5f * v * (1.0f + tanhf(0.79788456f * (v + 0.044715f * v * v * v)));
    default: return v;
  }
}

/* Stores ``v`` (bias and residual already added) to row-major position ``at``. */
static inline void store_scalar(const epilogue* ep, float v, float* y, int64_t at) {
  v = activation_scalar(ep->act, v);
  if (ep->y16)
    ep->y16[at] = f32_to_bf16(v);
  else
    y[at] = v;
}

/* Pack columns [n0, n0 + NR) of w[N, K] into panel[K / 2][NR] 32-bit pairs; columns >= N are 0. */
static void pack_panel(const uint16_t* w, int64_t N, int64_t K, int64_t n0, uint32_t* panel) {
  const int64_t kpairs = K / 2;
  for (int c = 0; c < NR; ++c) {
    int64_t n = n0 + c;
    if (n < N) {
      const uint32_t* row = (const uint32_t*)(w + n * K);
      for (int64_t kp = 0; kp < kpairs; ++kp) panel[kp * NR + c] = row[kp];
    } else {
      for (int64_t kp = 0; kp < kpairs; ++kp) panel[kp * NR + c] = 0;
    }
  }
}

/* Rows [m0, m1) x columns [n0, n0 + ncols) in plain C, from the packed panel. */
static void rows_generic(const uint16_t* x, const uint32_t* panel, const epilogue* ep, float* y, int64_t m0,
                         int64_t m1, int64_t n0, int ncols, int64_t N, int64_t K) {
  float acc[NR];
  for (int64_t m = m0; m < m1; ++m) {
    for (int c = 0; c < ncols; ++c) acc[c] = ep->bias ? ep->bias[n0 + c] : 0.0f;
    const uint16_t* xr = x + m * K;
    for (int64_t kp = 0; kp < K / 2; ++kp) {
      float a0 = bf16_to_f32(xr[2 * kp]), a1 = bf16_to_f32(xr[2 * kp + 1]);
      const uint32_t* bp = panel + kp * NR;
      for (int c = 0; c < ncols; ++c) {
        acc[c] += a0 * bf16_to_f32((uint16_t)(bp[c] & 0xffff)) + a1 * bf16_to_f32((uint16_t)(bp[c] >> 16));
      }
    }
    if (ep->residual)
      for (int c = 0; c < ncols; ++c) acc[c] += ep->residual[m * N + n0 + c];
    for (int c = 0; c < ncols; ++c) store_scalar(ep, acc[c], y, m * N + n0 + c);
  }
}

/* ------------------------------------------------------------------ AVX512-BF16 */

#if MLCV_X86
#define AVX512_BF16_TARGET MLCV_TARGET("avx512f,avx512bw,avx512vl,avx512bf16")

/* e^x for x in [-87, 88] (clamped outside): x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6
 * Taylor polynomial (relative error about 1e-7), times 2^n. */
AVX512_BF16_TARGET static inline __m512 exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln2 in two parts: r exact */
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

/* 1 / d: the 14-bit estimate and one Newton step (relative error about 1e-8), a few times the
 * throughput of a division, which would dominate the activation epilogues. */
AVX512_BF16_TARGET static inline __m512 reciprocal_avx512(__m512 d) {
  __m512 r = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r);
}

/* v * sigmoid(s v) = v / (1 + e^(-s v)). */
AVX512_BF16_TARGET static inline __m512 times_sigmoid_avx512(__m512 v, __m512 sv) {
  __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), sv));
  return _mm512_mul_ps(v, reciprocal_avx512(_mm512_add_ps(_mm512_set1_ps(1.0f), e)));
}

/* erf(z) = 1 - t (a1 + t (a2 + ... + t a5)) e^(-z^2), t = 1 / (1 + p |z|), odd in z: Abramowitz and
 * Stegun 7.1.26, absolute error below 1.5e-7 (invisible after the bf16 rounding that follows). */
AVX512_BF16_TARGET static inline __m512 erf_avx512(__m512 z) {
  __m512 a = _mm512_abs_ps(z);
  __m512 t = reciprocal_avx512(_mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
  __m512 q = _mm512_set1_ps(1.061405429f);
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.453152027f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.421413741f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-0.284496736f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.254829592f));
  q = _mm512_mul_ps(q, t);
  __m512 e = exp_avx512(_mm512_mul_ps(_mm512_mul_ps(a, a), _mm512_set1_ps(-1.0f)));
  __m512 y = _mm512_fnmadd_ps(q, e, _mm512_set1_ps(1.0f));
  __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_sub_ps(y, negative, _mm512_setzero_ps(), y);
}

AVX512_BF16_TARGET static inline __m512 activation_avx512(int act, __m512 v) {
  switch (act) {
    case ACT_QUICK_GELU: return times_sigmoid_avx512(v, _mm512_mul_ps(v, _mm512_set1_ps(1.702f)));
    case ACT_GELU_ERF: {
      __m512 half = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
      return _mm512_fmadd_ps(half, erf_avx512(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678f))), half);
    }
    case ACT_GELU_TANH: { /* 0.5 v (1 + tanh(u)) = v sigmoid(2u), u = sqrt(2 / pi) (v + 0.044715 v^3) */
      __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
      __m512 u = _mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v);
      return times_sigmoid_avx512(v, _mm512_mul_ps(u, _mm512_set1_ps(2.0f * 0.79788456f)));
    }
    default: return v;
  }
}

/* Stores the 16 lanes of ``v`` that ``mask`` selects at ``at``: residual added, activation, fp32 or bf16. */
AVX512_BF16_TARGET static inline void store_avx512(const epilogue* ep, __m512 v, __mmask16 mask, float* y,
                                                   int64_t at) {
  if (ep->residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, ep->residual + at));
  if (ep->act != ACT_NONE) v = activation_avx512(ep->act, v);
  if (ep->y16)
    _mm256_mask_storeu_epi16(ep->y16 + at, mask, (__m256i)_mm512_cvtneps_pbh(v));
  else
    _mm512_mask_storeu_ps(y + at, mask, v);
}

/* pack_panel with 16 x 16 word transposes: 16 rows of w are read 64 bytes at a
 * time and written as 16 panel rows, instead of one word at a time. */
AVX512_BF16_TARGET static void pack_panel_avx512(const uint16_t* w, int64_t N, int64_t K, int64_t n0,
                                                 uint32_t* panel) {
  const int64_t kpairs = K / 2;
  for (int cb = 0; cb < NR; cb += 16) {
    for (int64_t kb = 0; kb < kpairs; kb += 16) {
      int left = kpairs - kb < 16 ? (int)(kpairs - kb) : 16;
      __mmask16 mask = (__mmask16)((1u << left) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        int64_t n = n0 + cb + i;
        r[i] = n < N ? _mm512_maskz_loadu_epi32(mask, (const uint32_t*)(w + n * K) + kb) : _mm512_setzero_si512();
      }
      mlcv_transpose16x16(r);
      for (int j = 0; j < left; ++j) _mm512_storeu_si512(panel + (kb + j) * NR + cb, r[j]);
    }
  }
}

/* One register tile: ``mr`` rows x ``nv`` vectors of 16 columns (nv <= 4) over the whole K, bias
 * added, masked store. Both are constants where it is inlined, so each (mr, nv) is its own
 * unrolled loop. */
AVX512_BF16_TARGET __attribute__((always_inline)) static inline void tile_avx512(
    int mr, int nv, const uint16_t* x, const uint32_t* panel, const epilogue* ep, float* y, int64_t m, int64_t n0,
    int ncols, int64_t N, int64_t K) {
  __m512 acc[MR][4];
  const uint32_t* xr[MR];
  for (int r = 0; r < mr; ++r) {
    for (int j = 0; j < nv; ++j) acc[r][j] = _mm512_setzero_ps();
    xr[r] = (const uint32_t*)(x + (m + r) * K);
  }
  const int64_t kpairs = K / 2;
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const uint32_t* bp = panel + kp * NR;
    __m512bh b[4];
    for (int j = 0; j < nv; ++j) b[j] = (__m512bh)_mm512_loadu_si512(bp + 16 * j);
    for (int r = 0; r < mr; ++r) {
      __m512bh a = (__m512bh)_mm512_set1_epi32((int)xr[r][kp]);
      for (int j = 0; j < nv; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
    }
  }
  for (int j = 0; j < nv; ++j) {
    int left = ncols - 16 * j;
    if (left <= 0) break;
    __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    __m512 bj = ep->bias ? _mm512_maskz_loadu_ps(mask, ep->bias + n0 + 16 * j) : _mm512_setzero_ps();
    for (int r = 0; r < mr; ++r) {
      int64_t at = (m + r) * N + n0 + 16 * j;
      store_avx512(ep, _mm512_add_ps(acc[r][j], bj), mask, y, at);
    }
  }
}

/* Rows [m0, m1) of a panel with ``nv`` vectors of columns: whole MR-row tiles, then the rest. */
AVX512_BF16_TARGET __attribute__((always_inline)) static inline void rows_nv_avx512(
    int nv, const uint16_t* x, const uint32_t* panel, const epilogue* ep, float* y, int64_t m0, int64_t m1,
    int64_t n0, int ncols, int64_t N, int64_t K) {
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) tile_avx512(MR, nv, x, panel, ep, y, m, n0, ncols, N, K);
  switch (m1 - m) { /* constant row counts: each case is its own unrolled tile */
    case 5: tile_avx512(5, nv, x, panel, ep, y, m, n0, ncols, N, K); break;
    case 4: tile_avx512(4, nv, x, panel, ep, y, m, n0, ncols, N, K); break;
    case 3: tile_avx512(3, nv, x, panel, ep, y, m, n0, ncols, N, K); break;
    case 2: tile_avx512(2, nv, x, panel, ep, y, m, n0, ncols, N, K); break;
    case 1: tile_avx512(1, nv, x, panel, ep, y, m, n0, ncols, N, K); break;
    default: break;
  }
}

/* Rows [m0, m1) x the first ``ncols`` columns of a panel. A panel's last vectors that hold no
 * column are not computed: the last panel of N = 4304, or of keys (729 = 11 x 64 + 25), and the
 * second head-dim panel of p . v at head_dim 72 (8 of 64 columns) would otherwise cost a whole
 * 64-column tile. */
AVX512_BF16_TARGET static void rows_avx512(const uint16_t* x, const uint32_t* panel, const epilogue* ep, float* y,
                                           int64_t m0, int64_t m1, int64_t n0, int ncols, int64_t N, int64_t K) {
  switch ((ncols + 15) / 16) {
    case 1: rows_nv_avx512(1, x, panel, ep, y, m0, m1, n0, ncols, N, K); break;
    case 2: rows_nv_avx512(2, x, panel, ep, y, m0, m1, n0, ncols, N, K); break;
    case 3: rows_nv_avx512(3, x, panel, ep, y, m0, m1, n0, ncols, N, K); break;
    default: rows_nv_avx512(4, x, panel, ep, y, m0, m1, n0, ncols, N, K); break;
  }
}

/* ------------------------------------------------------------------ AMX */

#define AMX_TARGET MLCV_TARGET("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")

typedef struct {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} amx_tile_config;

/* tmm0-3: C (16 x 16 fp32), tmm4-5: A (16 rows x 32 bf16), tmm6-7: B (16 k pairs x 16 columns). */
AMX_TARGET static void amx_configure(void) {
  amx_tile_config cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

#endif

/* ------------------------------------------------------------------ driver */

typedef void (*pack_fn)(const uint16_t*, int64_t, int64_t, int64_t, uint32_t*);
typedef void (*rows_fn)(const uint16_t*, const uint32_t*, const epilogue*, float*, int64_t, int64_t, int64_t, int,
                        int64_t, int64_t);

typedef struct {
  const uint16_t* x;
  const uint16_t* w;
  epilogue ep;
  float* y;
  int64_t M, N, K;
  int64_t row_block; /* rows per work unit */
  int64_t row_blocks, panels;
  rows_fn rows;
  pack_fn pack;
  int64_t next_unit; /* taken with an atomic add: a thread the OS delays takes fewer units */
} linear_job;

/* The calling thread's weight panel or copied weight rows. */
static __thread mlcv_scratch thread_panel;

static uint32_t* panel_buffer(size_t words) { return (uint32_t*)mlcv_scratch_reserve(&thread_panel, words * 4); }

#if MLCV_X86
/* ------------------------------------------------------------------ AMX linear layer
 *
 * y^T = w . x^T with the weights as the A operand: an A tile is 16 weight rows x 32 k read
 * straight from w[N, K] (row stride K * 2 bytes), so the weights are never packed. x is packed
 * once per call into the B layout, per block of 16 rows:
 *
 *   xpack[mb][kp][r] = (x[16 mb + r][2 kp], x[16 mb + r][2 kp + 1])   (zero past M and past K)
 *
 * A C tile is then 16 columns x 16 rows of y, transposed in registers (mlcv_transpose16x16) before
 * the epilogue. The register block is 2 x 2 tiles: 32 weight rows x 32 rows of x.
 *
 * Blocking: x is split into chunks whose packed blocks fill about 3/4 of L2, so at small
 * batches every weight is read from memory once per call; K into chunks whose 32 weight rows
 * fill half of L1, which every pair of x blocks of the chunk passes (the C tiles wait in a
 * buffer between K chunks). A work unit is (chunk of x, a run of consecutive 32-row weight
 * blocks); while one block computes, the next one's weights are prefetched into L2. The
 * epilogue of a block's tiles runs on the vector units during the next block's tile products.
 * One thread-pool launch per call: each task packs the x blocks it claims, then computes.
 *
 * Tails: a K tail (K not a multiple of 32) is read from a zero-padded copy of its columns; the
 * last block of weight rows, when N is not a multiple of 32, from a zero-padded copy of those
 * rows; x rows past M are zero in xpack and not stored.
 */

#define AMX_WROWS 32 /* weight rows per unit: 2 A tiles */

typedef struct {
  const uint16_t* x;
  const uint16_t* w;
  epilogue ep;
  float* y;
  int64_t M, N, K;
  int64_t kp_padded;    /* k pairs per packed block: round_up(K, AMX_K) / 2 */
  uint32_t* xpack;      /* [m blocks][kp_padded][16] */
  int64_t m_blocks;     /* ceil(M / 16) */
  int64_t chunk_blocks; /* m blocks per chunk of x rows */
  int64_t w_blocks;     /* ceil(N / AMX_WROWS) */
  int64_t chunk_steps;  /* k steps per chunk of K */
  uint8_t* packed;      /* [m blocks]: set once the block is in xpack */
  int64_t next_pack;    /* x blocks are claimed for packing with an atomic add */
  int64_t next_unit;
} amx_linear_job;

/* Packs rows [16 mb, 16 mb + 16) of x into xpack block mb (16 x 16 word transposes). */
AMX_TARGET static void pack_x_block(const amx_linear_job* job, int64_t mb) {
  const int64_t K = job->K, kpairs = K / 2;
  uint32_t* dst = job->xpack + mb * job->kp_padded * 16;
  for (int64_t kb = 0; kb < job->kp_padded; kb += 16) {
    int left = kpairs - kb >= 16 ? 16 : kpairs - kb > 0 ? (int)(kpairs - kb) : 0;
    __mmask16 mask = (__mmask16)((1u << left) - 1);
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
      int64_t m = mb * 16 + i;
      r[i] = m < job->M ? _mm512_maskz_loadu_epi32(mask, (const uint32_t*)(job->x + m * K) + kb) : _mm512_setzero_si512();
    }
    mlcv_transpose16x16(r);
    for (int j = 0; j < 16; ++j) _mm512_store_si512(dst + (kb + j) * 16, r[j]);
  }
}

/* Packs the x blocks this thread claims, then marks each one ready. */
AMX_TARGET static void pack_claimed_blocks(amx_linear_job* job) {
  for (;;) {
    int64_t mb = __atomic_fetch_add(&job->next_pack, 1, __ATOMIC_RELAXED);
    if (mb >= job->m_blocks) return;
    pack_x_block(job, mb);
    __atomic_store_n(&job->packed[mb], 1, __ATOMIC_RELEASE);
  }
}

/* Waits until x block ``mb`` (another thread may still be packing it) is ready. */
static inline void wait_packed(const amx_linear_job* job, int64_t mb) {
  while (!__atomic_load_n(&job->packed[mb], __ATOMIC_ACQUIRE)) _mm_pause();
}

/* A C tile's 16 weight rows x 16 x rows (``out``, row-major fp32) to y rows [m0, m0 + 16) x
 * columns [n0, n0 + 16), through the epilogue; rows past M and columns past N are skipped. */
AMX_TARGET static void store_transposed(const amx_linear_job* job, const float* out, int64_t m0, int64_t n0) {
  int64_t left = job->N - n0;
  if (left <= 0) return;
  __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(out + 16 * i);
  mlcv_transpose16x16(r);
  __m512 bias = job->ep.bias ? _mm512_maskz_loadu_ps(mask, job->ep.bias + n0) : _mm512_setzero_ps();
  int rows = job->M - m0 < 16 ? (int)(job->M - m0) : 16;
  for (int j = 0; j < rows; ++j)
    store_avx512(&job->ep, _mm512_add_ps(_mm512_castsi512_ps(r[j]), bias), mask, job->y, (m0 + j) * job->N + n0);
}

/* Where the A tiles of one unit's weight rows come from: ``base`` (row stride ``stride`` bf16)
 * for the first ``full_steps`` k steps, ``tail`` (32 x 32, zero-padded) for the last one if any. */
typedef struct {
  const uint16_t* base;
  int64_t stride;
  int64_t full_steps, steps;
  uint16_t tail[AMX_WROWS * AMX_K] __attribute__((aligned(64)));
} weight_block;

/* Sets ``wb`` up for weight rows [n0, n0 + 32); when the rows run past N, the thread's panel
 * buffer holds a zero-padded copy of them. Returns 0, or -1 without scratch memory. */
AMX_TARGET static int weight_block_at(const amx_linear_job* job, int64_t n0, weight_block* wb) {
  const int64_t K = job->K, Kp = job->kp_padded * 2;
  wb->steps = Kp / AMX_K;
  if (n0 + AMX_WROWS > job->N) {
    uint16_t* copy = (uint16_t*)panel_buffer((size_t)AMX_WROWS * job->kp_padded);
    if (copy == NULL) return -1;
    for (int64_t r = 0; r < AMX_WROWS; ++r) {
      if (n0 + r < job->N) {
        memcpy(copy + r * Kp, job->w + (n0 + r) * K, (size_t)K * 2);
        memset(copy + r * Kp + K, 0, (size_t)(Kp - K) * 2);
      } else {
        memset(copy + r * Kp, 0, (size_t)Kp * 2);
      }
    }
    wb->base = copy;
    wb->stride = Kp;
    wb->full_steps = wb->steps;
    return 0;
  }
  wb->base = job->w + n0 * K;
  wb->stride = K;
  wb->full_steps = K / AMX_K;
  if (wb->full_steps < wb->steps) {
    int64_t k0 = wb->full_steps * AMX_K;
    memset(wb->tail, 0, sizeof(wb->tail));
    for (int r = 0; r < AMX_WROWS; ++r) memcpy(wb->tail + r * AMX_K, wb->base + r * K + k0, (size_t)(K - k0) * 2);
  }
  return 0;
}

/* Finished C tiles waiting for the epilogue: it runs on the vector units while the tile unit
 * computes the next block (a store right after the block would wait for its last products). */
typedef struct {
  float tiles[4][256] __attribute__((aligned(64)));
  int64_t m0[4], n0[4];
  int count, done;
} pending_tiles;

/* Runs the epilogue of the pending tiles up to the first ``upto``. */
AMX_TARGET static inline void finish_pending(const amx_linear_job* job, pending_tiles* pending, int upto) {
  for (; pending->done < upto; ++pending->done)
    store_transposed(job, pending->tiles[pending->done], pending->m0[pending->done], pending->n0[pending->done]);
}

/* C tiles 0-3 (0, 1: weight rows 0-15; 2, 3: rows 16-31; 0, 2: x block ``mb``; 1, 3: block mb + 1)
 * += the k steps [s0, s1); with ``two`` false only x block mb (tiles 0 and 2). The tiles start
 * from zero, or from ``partial`` (tiles 0-3 at 1024-byte steps) when it is set. The epilogue of
 * the ``pending`` tiles is spread over the k steps. */
AMX_TARGET static inline void amx_block(const amx_linear_job* job, const weight_block* wb, int64_t mb, int two,
                                        int64_t s0, int64_t s1, const float* partial, pending_tiles* pending) {
  const uint32_t* b0 = job->xpack + mb * job->kp_padded * 16;
  const uint32_t* b1 = b0 + job->kp_padded * 16;
  const int64_t stride_bytes = wb->stride * 2;
  if (partial) {
    _tile_loadd(0, partial, 64);
    _tile_loadd(1, partial + 256, 64);
    _tile_loadd(2, partial + 512, 64);
    _tile_loadd(3, partial + 768, 64);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = s0; s < s1; ++s) {
    if (s < wb->full_steps) {
      _tile_loadd(4, wb->base + s * AMX_K, stride_bytes);
      _tile_loadd(5, wb->base + 16 * wb->stride + s * AMX_K, stride_bytes);
    } else {
      _tile_loadd(4, wb->tail, AMX_K * 2);
      _tile_loadd(5, wb->tail + 16 * AMX_K, AMX_K * 2);
    }
    _tile_loadd(6, b0 + s * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if (two) {
      _tile_loadd(7, b1 + s * 256, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    finish_pending(job, pending, (int)((s - s0 + 1) * pending->count / (s1 - s0)));
  }
}

/* Moves C tiles 0-3 of x blocks (mb, mb + 1) x weight rows (n0, n0 + 16) into ``pending``
 * (tiles 0 and 2 only without ``two``); the pending tiles before them must be finished. */
AMX_TARGET static inline void hold_tiles(pending_tiles* pending, int64_t mb, int64_t n0, int two) {
  _tile_stored(0, pending->tiles[0], 64);
  _tile_stored(2, pending->tiles[1], 64);
  pending->m0[0] = pending->m0[1] = mb * 16;
  pending->n0[0] = n0;
  pending->n0[1] = n0 + 16;
  pending->count = 2;
  if (two) {
    _tile_stored(1, pending->tiles[2], 64);
    _tile_stored(3, pending->tiles[3], 64);
    pending->m0[2] = pending->m0[3] = (mb + 1) * 16;
    pending->n0[2] = n0;
    pending->n0[3] = n0 + 16;
    pending->count = 4;
  }
  pending->done = 0;
}

/* The calling thread's C tiles between k chunks. */
static __thread mlcv_scratch partial_scratch;

static float* partial_buffer(size_t floats) { return (float*)mlcv_scratch_reserve(&partial_scratch, floats * 4); }

/* Prefetches into L2 the share [part, part + 1) of ``parts`` of weight rows [n0, n0 + 32) (all in
 * w): the next unit's weights arrive from memory while this unit computes. */
AMX_TARGET static inline void prefetch_weight_rows(const amx_linear_job* job, int64_t n0, int64_t part,
                                                   int64_t parts) {
  const int64_t row_lines = job->K * 2 / 64, lines = AMX_WROWS * row_lines;
  const char* rows = (const char*)(job->w + n0 * job->K);
  for (int64_t i = part * lines / parts; i < (part + 1) * lines / parts; ++i)
    _mm_prefetch(rows + (i % AMX_WROWS) * job->K * 2 + (i / AMX_WROWS) * 64, _MM_HINT_T1);
}

/* Weight rows [n0, n0 + 32) x the x rows of blocks [mb0, mb1), K in chunks of ``job->chunk_steps``
 * k steps: a chunk of the 32 weight rows stays in L1 while every pair of x blocks passes it; the
 * C tiles of each pair wait in a buffer between chunks. */
AMX_TARGET static int amx_unit(const amx_linear_job* job, int64_t n0, int64_t next_n0, int64_t mb0, int64_t mb1,
                               weight_block* wb, pending_tiles* pending) {
  if (weight_block_at(job, n0, wb) != 0) return -1;
  float* partial = NULL;
  if (wb->steps > job->chunk_steps) {
    partial = partial_buffer((size_t)round_up(mb1 - mb0, 2) * 2 * 256);
    if (partial == NULL) return -1;
  }
  /* the next weight rows (when whole) are prefetched a share per block of this unit */
  int prefetch = next_n0 >= 0 && next_n0 + AMX_WROWS <= job->N;
  int64_t pairs = (mb1 - mb0 + 1) / 2, parts = pairs * ((wb->steps + job->chunk_steps - 1) / job->chunk_steps);
  int64_t part = 0;
  for (int64_t s0 = 0; s0 < wb->steps; s0 += job->chunk_steps) {
    int64_t s1 = s0 + job->chunk_steps < wb->steps ? s0 + job->chunk_steps : wb->steps;
    int last = s1 == wb->steps;
    for (int64_t mb = mb0; mb < mb1; mb += 2) {
      int two = mb + 1 < mb1;
      if (s0 == 0) {
        wait_packed(job, mb);
        if (two) wait_packed(job, mb + 1);
      }
      if (prefetch) prefetch_weight_rows(job, next_n0, part++, parts);
      float* tiles = partial ? partial + (mb - mb0) * 2 * 256 : NULL;
      amx_block(job, wb, mb, two, s0, s1, s0 > 0 ? tiles : NULL, pending);
      if (last) {
        hold_tiles(pending, mb, n0, two);
      } else {
        _tile_stored(0, tiles, 64);
        _tile_stored(1, tiles + 256, 64);
        _tile_stored(2, tiles + 512, 64);
        _tile_stored(3, tiles + 768, 64);
      }
    }
  }
  return 0;
}

/* One task: packs the x blocks it claims, then takes units (chunk of x blocks, run of weight
 * blocks), chunk-major, one at a time. Any order of the tasks works: a task packs every block
 * it claims before it waits for one. */
AMX_TARGET static int amx_compute_task(int task_id, TVMParallelGroupEnv* penv, void* cdata) {
  (void)task_id;
  amx_linear_job* job = (amx_linear_job*)cdata;
  weight_block wb;
  pending_tiles pending;
  pending.count = pending.done = 0;
  int64_t chunks = (job->m_blocks + job->chunk_blocks - 1) / job->chunk_blocks;
  /* a unit: (chunk of x, a run of consecutive weight blocks), about two per thread per chunk */
  int64_t run = (job->w_blocks + 2 * penv->num_task - 1) / (2 * penv->num_task);
  int64_t runs = (job->w_blocks + run - 1) / run, units = chunks * runs;
  int status = 0;
  pack_claimed_blocks(job);
  amx_configure();
  for (;;) {
    int64_t u = __atomic_fetch_add(&job->next_unit, 1, __ATOMIC_RELAXED);
    if (u >= units) break;
    int64_t mb0 = (u / runs) * job->chunk_blocks;
    int64_t mb1 = mb0 + job->chunk_blocks < job->m_blocks ? mb0 + job->chunk_blocks : job->m_blocks;
    int64_t first = (u % runs) * run, end = first + run < job->w_blocks ? first + run : job->w_blocks;
    for (int64_t b = first; b < end && status == 0; ++b)
      status = amx_unit(job, b * AMX_WROWS, b + 1 < end ? (b + 1) * AMX_WROWS : -1, mb0, mb1, &wb, &pending);
    if (status != 0) break;
  }
  finish_pending(job, &pending, pending.count);
  _tile_release();
  return status;
}

/* The L1 data cache of one core in bytes (from the OS, which reads cpuid); 32 KiB when unknown. */
static int64_t l1_cache_bytes(void) {
#if defined(_SC_LEVEL1_DCACHE_SIZE)
  long bytes = sysconf(_SC_LEVEL1_DCACHE_SIZE);
  if (bytes > 0) return bytes;
#endif
  return 32 << 10;
}

/* The L2 cache of one core in bytes (from the OS, which reads cpuid); 1 MiB when unknown. */
static int64_t l2_cache_bytes(void) {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (bytes > 0) return bytes;
#endif
  return 1 << 20;
}

/* The calling thread's packed x (and its ready flags). */
static __thread mlcv_scratch xpack_scratch;

static uint32_t* xpack_buffer(size_t words) { return (uint32_t*)mlcv_scratch_reserve(&xpack_scratch, words * 4); }

/* x . w^T finished by ``ep`` on AMX (M, N > 0, K even). Returns 0 on success. */
static int run_linear_amx(const uint16_t* x, const uint16_t* w, epilogue ep, float* y, int64_t M, int64_t N,
                          int64_t K) {
  amx_linear_job job = {x, w, ep, y, M, N, K, round_up(K, AMX_K) / 2, NULL, (M + 15) / 16, 0,
                        (N + AMX_WROWS - 1) / AMX_WROWS, 0, NULL, 0, 0};
  /* k chunks whose 32 weight rows fill about half of L1 */
  job.chunk_steps = l1_cache_bytes() / 2 / (AMX_WROWS * AMX_K * 2);
  if (job.chunk_steps < 1) job.chunk_steps = 1;
  int64_t block_bytes = job.kp_padded * 16 * 4;
  /* Chunks of x that fill about three quarters of L2 (the rest: the weight rows streaming
   * through), an even number of blocks, the same size as far as possible. */
  int64_t fit = 3 * l2_cache_bytes() / 4 / block_bytes;
  fit = fit < 2 ? 2 : fit & ~(int64_t)1;
  int64_t chunks = (job.m_blocks + fit - 1) / fit;
  job.chunk_blocks = round_up((job.m_blocks + chunks - 1) / chunks, 2);
  size_t xpack_words = (size_t)job.m_blocks * job.kp_padded * 16;
  job.xpack = xpack_buffer(xpack_words + (size_t)(job.m_blocks + 3) / 4); /* then the ready flags */
  if (job.xpack == NULL) return -1;
  job.packed = (uint8_t*)(job.xpack + xpack_words);
  memset(job.packed, 0, (size_t)job.m_blocks);
  /* One launch: every task packs the x blocks it claims, then computes (waiting, if it must,
   * for a block another task is packing); a launch less per layer, a synchronization less. */
  parallel_launch_fn launch = mlcv_thread_pool();
  if (launch == NULL) {
    TVMParallelGroupEnv env = {NULL, 1};
    return amx_compute_task(0, &env, &job);
  }
  return launch(amx_compute_task, &job, 0);
}
#endif

/* One of ``threads`` tasks: take (panel, row block) units, panel-major, until none are left.
 * With at least two panels per thread a task takes a whole panel (all its row
 * blocks) at a time, so every panel is packed once; with fewer, single units,
 * and a panel is packed again when the next unit a task takes has another one. */
static int run_units(linear_job* job, int threads) {
  int64_t units = job->panels * job->row_blocks;
  int64_t take = job->panels >= 2 * (int64_t)threads ? job->row_blocks : 1;
  uint32_t* panel = panel_buffer((size_t)(job->K / 2) * NR);
  if (panel == NULL) return -1;
  int64_t packed = -1;
  for (;;) {
    int64_t first = __atomic_fetch_add(&job->next_unit, take, __ATOMIC_RELAXED);
    if (first >= units) break;
    for (int64_t u = first; u < first + take && u < units; ++u) {
      int64_t p = u / job->row_blocks, rb = u % job->row_blocks;
      int64_t n0 = p * NR;
      if (p != packed) {
        job->pack(job->w, job->N, job->K, n0, panel);
        packed = p;
      }
      int64_t m0 = rb * job->row_block;
      int64_t m1 = m0 + job->row_block < job->M ? m0 + job->row_block : job->M;
      int ncols = job->N - n0 < NR ? (int)(job->N - n0) : NR;
      job->rows(job->x, panel, &job->ep, job->y, m0, m1, n0, ncols, job->N, job->K);
    }
  }
  return 0;
}

static int parallel_task(int task_id, TVMParallelGroupEnv* penv, void* cdata) {
  (void)task_id;
  return run_units((linear_job*)cdata, penv->num_task);
}

/* The panel packing and row kernels of the AVX512 and plain C paths (AMX: run_linear_amx). */
static pack_fn pack_for_path(int path) {
#if MLCV_X86
  if (path == PATH_AVX512) return pack_panel_avx512;
#endif
  (void)path;
  return pack_panel;
}

static rows_fn rows_for_path(int path) {
#if MLCV_X86
  if (path == PATH_AVX512) return rows_avx512;
#endif
  (void)path;
  return rows_generic;
}

/* x . w^T finished by ``ep`` into y (or ep.y16) on ``path``. Returns 0 on success. */
static int run_linear(int path, const uint16_t* x, const uint16_t* w, epilogue ep, float* y, int64_t M, int64_t N,
                      int64_t K) {
  if (K % 2 != 0 || !mlcv_bf16_path_supported(path) || ep.act < ACT_NONE || ep.act > ACT_GELU_TANH) return -1;
  if (M == 0 || N == 0) return 0;
#if MLCV_X86
  if (path == PATH_AMX) return run_linear_amx(x, w, ep, y, M, N, K);
#endif
  linear_job job = {x, w, ep, y, M, N, K, 0, 0, (N + NR - 1) / NR, rows_for_path(path), pack_for_path(path), 0};
  /* Row blocks of a few hundred rows: enough units for every thread even when
   * N has few panels (768 columns = 12 panels), each unit still long. */
  int64_t rows = 32 * MR;
  job.row_blocks = (M + rows - 1) / rows;
  job.row_block = (M + job.row_blocks - 1) / job.row_blocks;
  if (job.row_block % MR) job.row_block += MR - job.row_block % MR; /* whole tiles in every block but the last */
  job.row_blocks = (M + job.row_block - 1) / job.row_block;
  parallel_launch_fn launch = mlcv_thread_pool();
  if (launch != NULL) return launch(parallel_task, &job, 0);
  return run_units(&job, 1);
}

/* y = x . w^T (+ bias) (+ residual) with an explicit path (tests run every supported one); bias and
 * residual may be NULL. Returns 0 on success. */
int mlcv_bf16_linear_path(int path, const uint16_t* x, const uint16_t* w, const float* bias, const float* residual,
                          float* y, int64_t M, int64_t N, int64_t K) {
  epilogue ep = {bias, residual, ACT_NONE, NULL};
  return run_linear(path, x, w, ep, y, M, N, K);
}

/* y16 = bf16(act(x . w^T (+ bias))) with an explicit path; bias may be NULL. */
int mlcv_bf16_linear_act_path(int path, const uint16_t* x, const uint16_t* w, const float* bias, int act,
                              uint16_t* y16, int64_t M, int64_t N, int64_t K) {
  epilogue ep = {bias, NULL, act, y16};
  return run_linear(path, x, w, ep, NULL, M, N, K);
}

/* The entry points the library calls (compiler/passes/bf16_cpu.py), on the fastest path here:
 * y = x . w^T + bias, with ``nobias`` without it, with ``residual`` plus a residual [M, N], with
 * ``act`` an activation and a bf16 output. */
int mlcv_bf16_linear(const uint16_t* x, const uint16_t* w, const float* bias, float* y, int64_t M, int64_t N,
                     int64_t K) {
  return mlcv_bf16_linear_path(mlcv_bf16_best_path(), x, w, bias, NULL, y, M, N, K);
}

int mlcv_bf16_linear_nobias(const uint16_t* x, const uint16_t* w, float* y, int64_t M, int64_t N, int64_t K) {
  return mlcv_bf16_linear_path(mlcv_bf16_best_path(), x, w, NULL, NULL, y, M, N, K);
}

int mlcv_bf16_linear_residual(const uint16_t* x, const uint16_t* w, const float* bias, const float* residual,
                              float* y, int64_t M, int64_t N, int64_t K) {
  return mlcv_bf16_linear_path(mlcv_bf16_best_path(), x, w, bias, residual, y, M, N, K);
}

/* y16 = bf16(act(x . w^T (+ bias))): a linear layer, its activation and the cast that feeds the next
 * linear layer in one pass (``act``: the ACT_* numbers; bias may be NULL). */
int mlcv_bf16_linear_act(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y16, int64_t M,
                         int64_t N, int64_t K, int32_t act) {
  return mlcv_bf16_linear_act_path(mlcv_bf16_best_path(), x, w, bias, act, y16, M, N, K);
}

/* ------------------------------------------------------------------ attention
 *
 * out = softmax(scale q . k^T) v per (image, head), q, k, v and out [B, S, H, D] (the layout of
 * R.nn.attention), the inputs fp32 or bf16 (all three alike), out fp32 or bf16: a bf16 library's
 * q, k and v projections can store bf16 (half the bytes, no conversion here) and out-projection
 * takes bf16 anyway. For the linear layers' inputs bf16 libraries already round
 * activations to bf16; here q (scaled), k, the probabilities and v are rounded to bf16 too and
 * both products run on the GEMM's tiles (vdpbf16ps, or AMX tiles where the CPU has them; fp32
 * accumulation); max, exp and the row sums stay fp32. Plain C computes in fp32.
 *
 * A task is (image, head, chunk of queries). It converts the head's k to bf16 and packs it
 * into key panels (64 keys x D / 2 pairs, the GEMM's B layout), packs v into panels of 64
 * head-dim columns x key pairs (a pair of consecutive keys per 32-bit word), then per block
 * of ATT_ROWS queries: scores = q . k^T (fp32), exp and sums, the probabilities in bf16, and
 * (p . v) / sum. A head is split into chunks only when there are fewer heads than twice the
 * threads (each chunk packs the head's k and v again). On AMX both products store whole tiles
 * into buffers padded to them (amx_panel_raw): head_dim to a multiple of 32 for q . k^T (SigLIP's
 * 72 runs as 96), the keys of p . v to a multiple of 32.
 */

#define ATT_ROWS_AVX512 48 /* queries per block: a multiple of MR */
#define ATT_ROWS_AMX 64    /* a multiple of AMX_ROWS */

typedef struct {
  const void *q, *k, *v; /* fp32, or bf16 with in16 */
  void* out;             /* fp32, or bf16 with out16 */
  int64_t B, S, H, D;
  float scale;
  int in16, out16;
  int64_t next_unit;
} attention_job;

/* Element ``at`` of the attention input ``t`` (fp32, or bf16 with ``in16``) as fp32. */
static inline float attention_in(const attention_job* job, const void* t, int64_t at) {
  return job->in16 ? bf16_to_f32(((const uint16_t*)t)[at]) : ((const float*)t)[at];
}

/* The calling thread's attention blocks. */
static __thread mlcv_scratch attention_scratch;

static void* attention_buffer(size_t bytes) { return mlcv_scratch_reserve(&attention_scratch, bytes); }

/* Queries [q0, q1) of head (b, h) in plain fp32. */
static int attention_generic(const attention_job* job, int64_t b, int64_t h, int64_t q0, int64_t q1) {
  const int64_t S = job->S, H = job->H, D = job->D;
  float* p = (float*)attention_buffer((size_t)(S + D) * sizeof(float));
  if (p == NULL) return -1;
  float* oi = p + S;
  for (int64_t i = q0; i < q1; ++i) {
    const int64_t qi = ((b * S + i) * H + h) * D;
    float top = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < S; ++j) {
      const int64_t kj = ((b * S + j) * H + h) * D;
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += attention_in(job, job->q, qi + d) * attention_in(job, job->k, kj + d);
      p[j] = s * job->scale;
      top = p[j] > top ? p[j] : top;
    }
    for (int64_t j = 0; j < S; ++j) {
      p[j] = expf(p[j] - top);
      sum += p[j];
    }
    for (int64_t d = 0; d < D; ++d) oi[d] = 0.0f;
    for (int64_t j = 0; j < S; ++j) {
      const int64_t vj = ((b * S + j) * H + h) * D;
      for (int64_t d = 0; d < D; ++d) oi[d] += p[j] * attention_in(job, job->v, vj + d);
    }
    for (int64_t d = 0; d < D; ++d) {
      if (job->out16)
        ((uint16_t*)job->out)[qi + d] = f32_to_bf16(oi[d] / sum);
      else
        ((float*)job->out)[qi + d] = oi[d] / sum;
    }
  }
  return 0;
}

#if MLCV_X86
/* Up to 16 elements (``mask``) of ``t`` (fp32, or bf16 with ``in16``) from ``at`` as fp32. */
AVX512_BF16_TARGET static inline __m512 load_f32x16(int in16, const void* t, int64_t at, __mmask16 mask) {
  if (!in16) return _mm512_maskz_loadu_ps(mask, (const float*)t + at);
  __m512i words = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t*)t + at));
  return _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
}

/* ``count`` values of ``src`` (fp32, or bf16 with ``in16``) from ``at``, times ``scale``, -> bf16. */
AVX512_BF16_TARGET static void row_to_bf16(int in16, const void* src, int64_t at, float scale, uint16_t* dst,
                                           int64_t count) {
  for (int64_t i = 0; i < count; i += 16) {
    __mmask16 mask = count - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (count - i)) - 1);
    __m512 v = _mm512_mul_ps(load_f32x16(in16, src, at + i, mask), _mm512_set1_ps(scale));
    _mm256_mask_storeu_epi16(dst + i, mask, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

/* v rows of head (b, h) -> panels of 64 head-dim columns: panel[jp][c] = (v[2 jp][c], v[2 jp + 1][c])
 * in bf16, zero keys past S (up to 2 key_pairs); columns past D are zero. */
AVX512_BF16_TARGET static void pack_values(const attention_job* job, int64_t b, int64_t h, int64_t key_pairs,
                                           uint32_t* panels) {
  const int64_t S = job->S, H = job->H, D = job->D, DP = round_up(D, NR);
  /* word 2c of the result <- low half element c (key 2 jp), word 2c + 1 <- high half element c */
  uint16_t order[32];
  for (int c = 0; c < 16; ++c) {
    order[2 * c] = (uint16_t)c;
    order[2 * c + 1] = (uint16_t)(16 + c);
  }
  __m512i interleave = _mm512_loadu_si512(order);
  for (int64_t jp = 0; jp < key_pairs; ++jp) {
    const int64_t v0 = ((b * S + 2 * jp) * H + h) * D, v1 = v0 + H * D;
    const int has0 = 2 * jp < S, has1 = 2 * jp + 1 < S;
    for (int64_t c = 0; c < DP; c += 16) {
      __mmask16 mask = c >= D ? 0 : D - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - c)) - 1);
      __m512 lo = has0 ? load_f32x16(job->in16, job->v, v0 + c, mask) : _mm512_setzero_ps();
      __m512 hi = has1 ? load_f32x16(job->in16, job->v, v1 + c, mask) : _mm512_setzero_ps();
      __m512i pair = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      _mm512_storeu_si512(panels + (c / NR) * key_pairs * NR + jp * NR + c % NR, pair);
    }
  }
}

/* 2^x for x <= 0 (0 below -126): 2^n 2^f with n = round(x), |f| <= 1/2, 2^f by a cubic fitted
 * for the least maximum relative error on [-1/2, 1/2] (7.5e-5, under a twentieth of the bf16
 * rounding of the probabilities that follows). Fewer operations than exp_avx512: the softmax's
 * exponentials are most of the attention's vector work. */
AVX512_BF16_TARGET static inline __m512 exp2_nonpositive_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(0.0551716649f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.242611122f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693260986f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.999928074f));
  return _mm512_scalef_ps(p, n);
}

/* A row of scores in base-2 units (q was scaled by log2 e): 2^(s - max) in bf16 into p (zero
 * past S, up to ``keys_padded``), which is exp of the natural-unit scores minus their max; returns
 * the sum. */
AVX512_BF16_TARGET static float softmax_row(const float* scores, int64_t S, int64_t keys_padded, uint16_t* p) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < S; j += 16) {
    __mmask16 mask = S - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - j)) - 1);
    top = _mm512_mask_max_ps(top, mask, top, _mm512_maskz_loadu_ps(mask, scores + j));
  }
  __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < S; j += 16) {
    __mmask16 mask = S - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - j)) - 1);
    __m512 e = exp2_nonpositive_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + j), row_max));
    e = _mm512_maskz_mov_ps(mask, e);
    sum = _mm512_add_ps(sum, e);
    _mm256_mask_storeu_epi16(p + j, mask, (__m256i)_mm512_cvtneps_pbh(e));
  }
  for (int64_t j = S; j < keys_padded; ++j) p[j] = 0;
  return _mm512_reduce_add_ps(sum);
}

/* c[rows][cols] (row stride ldc floats) = a[rows][K] (row stride lda) . the first ``cols`` columns of
 * panel ([K / 2][NR] pairs) on AMX tiles stored as they are: rows and cols multiples of 32 (cols at
 * most NR), K of AMX_K, tiles configured by the caller. Attention's buffers are padded to whole
 * tiles, so no row or column needs a mask. */
AMX_TARGET static void amx_panel_raw(const uint16_t* a, int64_t lda, const uint32_t* panel, float* c, int64_t ldc,
                                     int64_t K, int64_t rows, int cols) {
  for (int64_t m = 0; m < rows; m += AMX_ROWS) {
    for (int cb = 0; cb < cols; cb += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < K; k += AMX_K) {
        _tile_loadd(4, a + m * lda + k, lda * 2);
        _tile_loadd(5, a + (m + 16) * lda + k, lda * 2);
        _tile_loadd(6, panel + (k / 2) * NR + cb, NR * 4);
        _tile_loadd(7, panel + (k / 2) * NR + cb + 16, NR * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c + m * ldc + cb, ldc * 4);
      _tile_stored(1, c + m * ldc + cb + 16, ldc * 4);
      _tile_stored(2, c + (m + 16) * ldc + cb, ldc * 4);
      _tile_stored(3, c + (m + 16) * ldc + cb + 16, ldc * 4);
    }
  }
}

/* ``count`` values of ``src`` (as row_to_bf16) into a row of ``width`` >= count bf16, zero past count. */
AVX512_BF16_TARGET static void row_to_bf16_padded(int in16, const void* src, int64_t at, float scale, uint16_t* dst,
                                                  int64_t count, int64_t width) {
  row_to_bf16(in16, src, at, scale, dst, count);
  for (int64_t i = count; i < width; ++i) dst[i] = 0;
}

/* Queries [q0, q1) of head (b, h), ATT_ROWS at a time. With ``raw_amx`` (AMX) both products are
 * amx_panel_raw on buffers padded to whole tiles: query blocks to 32 rows, head_dim to DK, a
 * multiple of AMX_K (zero columns of q and k add nothing to q . k^T), the keys of p . v to a
 * multiple of AMX_K (zero probabilities, zero values). Else rows_avx512 on the unpadded head_dim
 * and key pairs. */
AVX512_BF16_TARGET static inline int attention_tiles(const attention_job* job, int64_t b, int64_t h, int64_t q0,
                                                     int64_t q1, const int64_t ATT_ROWS, int raw_amx) {
  const int64_t S = job->S, H = job->H, D = job->D;
  const int64_t key_align = raw_amx ? AMX_K : 2, DK = raw_amx ? round_up(D, AMX_K) : D;
  const int64_t SK = round_up(S, NR), SE = round_up(S, key_align), DP = round_up(D, NR);
  size_t kb_bytes = (size_t)round_up(S * DK * 2, 64), kp_bytes = (size_t)SK * DK * 2;
  size_t vp_bytes = (size_t)SE / 2 * DP * 4, qb_bytes = (size_t)round_up(ATT_ROWS * DK * 2, 64);
  size_t sc_bytes = (size_t)ATT_ROWS * SK * 4, pb_bytes = (size_t)round_up(ATT_ROWS * SE * 2, 64);
  size_t ob_bytes = (size_t)ATT_ROWS * DP * 4;
  uint8_t* base = (uint8_t*)attention_buffer(kb_bytes + kp_bytes + vp_bytes + qb_bytes + sc_bytes + pb_bytes +
                                             ob_bytes + ATT_ROWS * sizeof(float));
  if (base == NULL) return -1;
  uint16_t* kb = (uint16_t*)base;
  uint32_t* kp = (uint32_t*)(base + kb_bytes);
  uint32_t* vp = (uint32_t*)((uint8_t*)kp + kp_bytes);
  uint16_t* qb = (uint16_t*)((uint8_t*)vp + vp_bytes);
  float* scores = (float*)((uint8_t*)qb + qb_bytes);
  uint16_t* pb = (uint16_t*)((uint8_t*)scores + sc_bytes);
  float* ob = (float*)((uint8_t*)pb + pb_bytes);
  float* sums = (float*)((uint8_t*)ob + ob_bytes);
  const epilogue plain = {NULL, NULL, ACT_NONE, NULL};

  for (int64_t j = 0; j < S; ++j)
    row_to_bf16_padded(job->in16, job->k, ((b * S + j) * H + h) * D, 1.0f, kb + j * DK, D, DK);
  for (int64_t n0 = 0; n0 < SK; n0 += NR) pack_panel_avx512(kb, S, DK, n0, kp + n0 * (DK / 2));
  pack_values(job, b, h, SE / 2, vp);
  for (int64_t m0 = q0; m0 < q1; m0 += ATT_ROWS) {
    int64_t rows = q1 - m0 < ATT_ROWS ? q1 - m0 : ATT_ROWS;
    const float scale_log2 = job->scale * 1.44269504f; /* scores in base-2 units for softmax_row */
    for (int64_t r = 0; r < rows; ++r)
      row_to_bf16_padded(job->in16, job->q, ((b * S + m0 + r) * H + h) * D, scale_log2, qb + r * DK, D, DK);
    const int64_t tile_rows = round_up(rows, AMX_ROWS); /* raw_amx: query blocks padded to whole tiles */
    if (raw_amx) {
      memset(qb + rows * DK, 0, (size_t)(tile_rows - rows) * DK * 2);
      memset(pb + rows * SE, 0, (size_t)(tile_rows - rows) * SE * 2);
    }
    for (int64_t n0 = 0; n0 < SK; n0 += NR) { /* scores = q . k^T */
      int ncols = S - n0 < NR ? (int)(S - n0) : NR;
      if (raw_amx)
        amx_panel_raw(qb, DK, kp + n0 * (DK / 2), scores + n0, SK, DK, tile_rows, NR);
      else
        rows_avx512(qb, kp + n0 * (D / 2), &plain, scores, 0, rows, n0, ncols, SK, D);
    }
    for (int64_t r = 0; r < rows; ++r) sums[r] = softmax_row(scores + r * SK, S, SE, pb + r * SE);
    for (int64_t c0 = 0; c0 < DP; c0 += NR) { /* ob = p . v */
      int ncols = D - c0 < NR ? (int)(D - c0) : NR;
      if (raw_amx)
        amx_panel_raw(pb, SE, vp + (c0 / NR) * (SE / 2) * NR, ob + c0, DP, SE, tile_rows, (int)round_up(ncols, 32));
      else
        rows_avx512(pb, vp + (c0 / NR) * (SE / 2) * NR, &plain, ob, 0, rows, c0, ncols, DP, SE);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = ((b * S + m0 + r) * H + h) * D;
      __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
      for (int64_t c = 0; c < D; c += 16) {
        __mmask16 mask = D - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - c)) - 1);
        __m512 value = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, ob + r * DP + c), inv);
        if (job->out16)
          _mm256_mask_storeu_epi16((uint16_t*)job->out + o + c, mask, (__m256i)_mm512_cvtneps_pbh(value));
        else
          _mm512_mask_storeu_ps((float*)job->out + o + c, mask, value);
      }
    }
  }
  return 0;
}

AVX512_BF16_TARGET static int attention_avx512(const attention_job* job, int64_t b, int64_t h, int64_t q0,
                                               int64_t q1) {
  return attention_tiles(job, b, h, q0, q1, ATT_ROWS_AVX512, 0);
}

AMX_TARGET static int attention_amx(const attention_job* job, int64_t b, int64_t h, int64_t q0, int64_t q1) {
  amx_configure();
  int status = attention_tiles(job, b, h, q0, q1, ATT_ROWS_AMX, 1);
  _tile_release();
  return status;
}
#endif

typedef int (*attention_fn)(const attention_job*, int64_t, int64_t, int64_t, int64_t);

typedef struct {
  attention_job* job;
  attention_fn run;
} attention_launch;

static int attention_units(attention_launch* launch, int threads) {
  attention_job* job = launch->job;
  int64_t heads = job->B * job->H;
  int64_t chunks = heads >= 2 * (int64_t)threads ? 1 : (2 * threads + heads - 1) / heads;
  int64_t per_chunk = round_up((job->S + chunks - 1) / chunks, MR);
  chunks = (job->S + per_chunk - 1) / per_chunk;
  for (;;) {
    int64_t u = __atomic_fetch_add(&job->next_unit, 1, __ATOMIC_RELAXED);
    if (u >= heads * chunks) return 0;
    int64_t bh = u / chunks, q0 = (u % chunks) * per_chunk;
    int64_t q1 = q0 + per_chunk < job->S ? q0 + per_chunk : job->S;
    if (launch->run(job, bh / job->H, bh % job->H, q0, q1) != 0) return -1;
  }
}

static int attention_task(int task_id, TVMParallelGroupEnv* penv, void* cdata) {
  (void)task_id;
  return attention_units((attention_launch*)cdata, penv->num_task);
}

/* out = softmax(scale q . k^T) v with an explicit path (tests run every supported one); q, k, v bf16
 * when ``in16`` is set (else fp32), out bf16 when ``out16`` is set. Returns 0 on success. */
int mlcv_bf16_attention_io_path(int path, const void* q, const void* k, const void* v, void* out, int64_t B,
                                int64_t S, int64_t H, int64_t D, float scale, int32_t in16, int32_t out16) {
  if (D % 2 != 0 || !mlcv_bf16_path_supported(path)) return -1;
  if (B == 0 || S == 0 || H == 0 || D == 0) return 0;
  attention_job job = {q, k, v, out, B, S, H, D, scale, in16 != 0, out16 != 0, 0};
  attention_launch launch = {&job, attention_generic};
#if MLCV_X86
  if (path == PATH_AVX512) launch.run = attention_avx512;
  if (path == PATH_AMX) launch.run = attention_amx;
#endif
  parallel_launch_fn pool = mlcv_thread_pool();
  if (pool != NULL) return pool(attention_task, &launch, 0);
  return attention_units(&launch, 1);
}

/* fp32 q, k, v and out with an explicit path. */
int mlcv_bf16_attention_path(int path, const float* q, const float* k, const float* v, float* out, int64_t B,
                             int64_t S, int64_t H, int64_t D, float scale) {
  return mlcv_bf16_attention_io_path(path, q, k, v, out, B, S, H, D, scale, 0, 0);
}

/* The entry points bf16 libraries call for R.nn.attention (compiler/passes/bf16_cpu.py): fp32 q, k,
 * v and out; with ``io`` q, k, v bf16 when ``in16`` is set and out bf16 when ``out16`` is set. */
int mlcv_bf16_attention(const float* q, const float* k, const float* v, float* out, int64_t B, int64_t S, int64_t H,
                        int64_t D, float scale) {
  return mlcv_bf16_attention_io_path(mlcv_bf16_best_path(), q, k, v, out, B, S, H, D, scale, 0, 0);
}

int mlcv_bf16_attention_io(const void* q, const void* k, const void* v, void* out, int64_t B, int64_t S, int64_t H,
                           int64_t D, float scale, int32_t in16, int32_t out16) {
  return mlcv_bf16_attention_io_path(mlcv_bf16_best_path(), q, k, v, out, B, S, H, D, scale, in16, out16);
}
