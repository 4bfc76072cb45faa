/*
 * fp32 linear layer for CPU libraries: y[M, N] = epilogue(x[M, K] . w[N, K]^T).
 *
 * w is read in its checkpoint layout [out, in], in fp32 or, for a bf16 library on a CPU without
 * bf16 arithmetic, in bf16 (``mlcv_f32_linear_bf16w``: the weights are widened to fp32 as they are
 * packed), or in fp32 packed once, when the library is loaded (``mlcv_f32_pack_weights`` and the
 * ``_packed`` entries: the panels of the path that runs here, no packing per call).
 * The path is chosen at run time from the CPU's features: AVX-512F (Intel
 * Skylake-SP and later, AMD Zen 4/5), AVX2 + FMA (Intel Haswell to Alder
 * Lake, AMD Zen 1-3) or plain C on anything else.
 *
 * The vector paths have the blocking of a GotoBLAS / brgemm style GEMM:
 *
 *   register tile  MR rows x NR columns of fp32 accumulators (6 x 64 in zmm, 6 x 16 in ymm); every
 *                  k step loads the NR columns of the packed weights and broadcasts MR values of x
 *                  (a memory operand of the FMA);
 *   weight slice   NR output columns x KC values of k of w, transposed into slice[k][NR] (16 x 16
 *                  or 8 x 8 register transposes) once per work unit and read by all its row tiles;
 *   K block        KC from the detected L2 size (cpuid leaf 4 / 0x8000001D): the slice takes at
 *                  most half of L2, so ViT layers (K <= 4096) have one block on a 2 MiB L2 and the
 *                  accumulators stay in registers over the whole K; a longer K keeps partial sums
 *                  in y between blocks, the epilogue runs on the last one (k_block has the
 *                  measurement against L1-sized blocks).
 *
 * x is not packed: the MR rows of a tile are read in k order, and the next
 * tile's rows are prefetched into L1 while a tile runs. Work is split over TVM's
 * thread pool (TVMBackendParallelLaunch) into (block of rows, group of panels)
 * units that the threads take one at a time, each thread its next unit before
 * it runs the current one, whose last panel then prefetches the next unit's
 * first weights. One job may hold two or three linear layers of one input
 * (``mlcv_f32_linear_group``: q, k and v), their panels numbered one layer
 * after the other, so that they share one launch and one split.
 *
 * The epilogue adds a bias [N], multiplies by a layer scale [N], adds a
 * residual [M, N], applies an activation (quick GELU, GELU with erf or tanh,
 * SiLU) or multiplies by a gate [M, N] (SwiGLU's up projection times
 * silu(gate)).
 *
 * Compiled with the host C compiler at export (cpu_f32_gemm.py) and linked into
 * the library; AVX-512 is enabled per function, so the object runs on any
 * x86-64 CPU and uses what it finds.
 */

#include <math.h>
#include <string.h>
#include <unistd.h>

#include "cpu_kernels.h" /* found beside this file */

enum { F32_PATH_GENERIC = 0, F32_PATH_AVX512 = 1, F32_PATH_AVX2 = 2 };

/* Activations of the epilogue (``ACTIVATIONS`` in cpu_f32_gemm.py has the same numbers). */
enum { F32_ACT_NONE = 0, F32_ACT_QUICK_GELU = 1, F32_ACT_GELU_ERF = 2, F32_ACT_GELU_TANH = 3, F32_ACT_SILU = 4 };

/* Register tile, every AVX-512 CPU: 6 x 64 = 24 zmm accumulators + 4 weight vectors + 1 broadcast;
 * a k step is 4 loads + 6 broadcasts for 24 FMAs (12 cycles on Intel's two FMA ports, 24 on
 * Zen 4's one 512-bit FMA per cycle): fewer loads than either core's two per cycle allow, and 24
 * independent accumulators cover the FMA latency of both. On the ViT shapes 8 x 48, 12 x 32 and
 * 14 x 32 measured the same as 6 x 64 on one Intel core (within the noise of a shared machine;
 * scripts/dev/f32_gemm_bench.py --tile); the wider NR halves the weight packing per row. */
#ifndef F32_MR
#define F32_MR 6 /* rows of the register tile */
#endif
#ifndef F32_NV
#define F32_NV 4 /* zmm per row: NR = 16 NV columns */
#endif
#define F32_NR (16 * F32_NV)

/* Register tile on CPUs with AVX2 and FMA (16 ymm): 6 x 16 = 12 accumulators + 2 weight vectors + 1
 * broadcast; a k step is 2 loads + 6 broadcasts for 12 FMAs (6 cycles on two 256-bit FMA ports), and
 * 12 independent accumulators cover two ports x 4-5 cycles of FMA latency. 4 x 24 (-DF32_AVX2_MR=4
 * -DF32_AVX2_NV=3: 3 loads + 4 broadcasts for the same 12 FMAs) measured faster on one thread in
 * scripts/dev/f32_gemm_bench.py on a Zen 1 core but not in a whole ViT-B/16 library on both cores
 * (1.4 % slower, level once the loads below were plain; scripts/dev/bf16_kernel_ab.py model --kernel
 * f32), so 6 x 16 stays. */
#ifndef F32_AVX2_MR
#define F32_AVX2_MR 6
#endif
#ifndef F32_AVX2_NV
#define F32_AVX2_NV 2 /* ymm per row */
#endif
#define F32_AVX2_NR (8 * F32_AVX2_NV)

/* Columns of a panel on the plain C path. */
#define F32_GENERIC_NR 64
#ifndef F32_UNITS_PER_THREAD
#define F32_UNITS_PER_THREAD 4 /* work units per thread: a thread the OS delays takes fewer */
#endif

#ifndef F32_PREFETCH_ROWS
#define F32_PREFETCH_ROWS 300 /* row blocks up to this size prefetch the next slice's weights */
#endif

/* ------------------------------------------------------------------ features */

static int f32_probe_avx512(void) {
#if MLCV_X86
  uint32_t a, b, c, d;
  if (MLCV_EMULATED) return 1;
  if (!mlcv_os_saves_avx512()) return 0;
  __cpuid_count(7, 0, a, b, c, d);
  return (b & (1u << 16)) != 0; /* AVX512F */
#else
  return 0;
#endif
}

static int f32_probe_avx2(void) {
#if MLCV_X86
  uint32_t a, b, c, d;
  if (MLCV_EMULATED) return 1;
  if (!mlcv_os_saves_avx()) return 0;
  __cpuid(1, a, b, c, d);
  int fma = (c & (1u << 12)) != 0;
  __cpuid_count(7, 0, a, b, c, d);
  return fma && (b & (1u << 5)) != 0; /* AVX2 */
#else
  return 0;
#endif
}

static int f32_path_known[3] = {1, -1, -1};

/* Whether ``path`` (0 generic, 1 AVX-512, 2 AVX2 + FMA) can run here; probed once per path. */
int mlcv_f32_path_supported(int path) {
  if (path < F32_PATH_GENERIC || path > F32_PATH_AVX2) return 0;
  int known = __atomic_load_n(&f32_path_known[path], __ATOMIC_RELAXED);
  if (known < 0) {
    known = path == F32_PATH_AVX512 ? f32_probe_avx512() : f32_probe_avx2();
    __atomic_store_n(&f32_path_known[path], known, __ATOMIC_RELAXED);
  }
  return known;
}

/* The fastest path this CPU runs. */
int mlcv_f32_best_path(void) {
  if (mlcv_f32_path_supported(F32_PATH_AVX512)) return F32_PATH_AVX512;
  return mlcv_f32_path_supported(F32_PATH_AVX2) ? F32_PATH_AVX2 : F32_PATH_GENERIC;
}

/* Rows and columns of ``path``'s register tile (the generic path's rows are its row-block unit). */
static int f32_tile_rows(int path) { return path == F32_PATH_AVX2 ? F32_AVX2_MR : F32_MR; }

static int f32_tile_cols(int path) {
  return path == F32_PATH_AVX512 ? F32_NR : path == F32_PATH_AVX2 ? F32_AVX2_NR : F32_GENERIC_NR;
}

/* Size in bytes of the cache of ``level`` (2 or 3) one core uses, from cpuid's deterministic cache
 * parameters (leaf 4 on Intel, 0x8000001D on AMD), else sysconf; 0 when neither tells. */
static int64_t cache_bytes_detect(uint32_t level) {
#if MLCV_X86
  uint32_t a, b, c, d;
  uint32_t leaves[2] = {4, 0x8000001D};
  for (int l = 0; l < 2; ++l) {
    uint32_t max_leaf = __get_cpuid_max(leaves[l] & 0x80000000u, NULL);
    if (max_leaf < leaves[l]) continue;
    for (uint32_t sub = 0; sub < 8; ++sub) {
      __cpuid_count(leaves[l], sub, a, b, c, d);
      uint32_t type = a & 0x1f;
      if (type == 0) break;
      if ((type == 1 || type == 3) && ((a >> 5) & 7) == level) { /* a data or unified cache */
        int64_t ways = ((b >> 22) & 0x3ff) + 1, parts = ((b >> 12) & 0x3ff) + 1, line = (b & 0xfff) + 1;
        return ways * parts * line * ((int64_t)c + 1);
      }
    }
  }
#endif
  long s = -1;
#if defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
  s = sysconf(level == 2 ? _SC_LEVEL2_CACHE_SIZE : _SC_LEVEL3_CACHE_SIZE);
#endif
  return s > 0 ? s : 0;
}

static int64_t l2_known, l3_known;

/* The level-2 cache size in bytes (detected once; outside 256 KiB .. 64 MiB taken as 1 MiB). */
int64_t mlcv_f32_l2_bytes(void) {
  int64_t s = __atomic_load_n(&l2_known, __ATOMIC_RELAXED);
  if (s <= 0) {
    s = cache_bytes_detect(2);
    if (s < 256 * 1024 || s > 64 * 1024 * 1024) s = 1024 * 1024;
    __atomic_store_n(&l2_known, s, __ATOMIC_RELAXED);
  }
  return s;
}

/* The level-3 cache size in bytes (detected once); -1 when unknown or outside 1 MiB .. 4 GiB. */
static int64_t l3_bytes(void) {
  int64_t s = __atomic_load_n(&l3_known, __ATOMIC_RELAXED);
  if (s == 0) {
    s = cache_bytes_detect(3);
    if (s < 1024 * 1024 || s > ((int64_t)4 << 30)) s = -1;
    __atomic_store_n(&l3_known, s, __ATOMIC_RELAXED);
  }
  return s;
}

/* K block for slices of ``nr`` columns: the packed KC x NR weight slice takes at most half of L2
 * (the rest holds the rows of x being read and the output rows); a multiple of 16. With 2 MiB of L2 that is K up to 4096 in one
 * block. The FMAs read the slice from L2 (NR / 16 vectors per k step, sequential, which the L2
 * streamer prefetches) while the accumulators stay in registers over the whole block: against K
 * blocks that keep the slice in L1 (partial sums through y every 96 k) this measured 5-20 % faster
 * on the ViT shapes (one core, Intel). */
static int64_t k_block(int64_t K, int64_t nr) {
  int64_t kc = mlcv_f32_l2_bytes() / 2 / (nr * 4) / 16 * 16;
  if (kc < 256) kc = 256;
  if (K <= kc) return K;
  int64_t blocks = (K + kc - 1) / kc; /* equal blocks: no short last block */
  kc = (K + blocks - 1) / blocks;
  return (kc + 15) / 16 * 16;
}

/* ------------------------------------------------------------------ epilogue */

/* What happens to v = x . w^T before the store: v + bias[N], times scale[N] (a layer scale), plus
 * residual[M, N], the activation ``act``, times gate[M, N]; each optional. */
typedef struct {
  const float* bias;
  const float* scale;
  const float* residual;
  const float* gate;
  int act;
} f32_epilogue;

static inline float f32_activation_scalar(int act, float v) {
  switch (act) {
    case F32_ACT_QUICK_GELU: return v / (1.0f + expf(-1.702f * v));
    case F32_ACT_GELU_ERF: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case F32_ACT_GELU_TANH: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case F32_ACT_SILU: return v / (1.0f + expf(-v));
    default: return v;
  }
}

static inline float f32_finish_scalar(const f32_epilogue* ep, float v, int64_t n, int64_t at) {
  if (ep->bias) v += ep->bias[n];
  if (ep->scale) v *= ep->scale[n];
  if (ep->residual) v += ep->residual[at];
  v = f32_activation_scalar(ep->act, v);
  if (ep->gate) v *= ep->gate[at];
  return v;
}

/* The weights w[N, K]: fp32, or bf16 (their raw 16-bit words: a bf16 library on a CPU without bf16
 * arithmetic keeps its weights in bf16 and computes in fp32), widened to fp32 where they are read;
 * or (``packed``) fp32 in the panels of the job's vector path, as mlcv_f32_pack_weights wrote them. */
typedef struct {
  const void* data;
  int bf16;
  int packed;
} f32_weights;

/* The weights of the slice a thread runs next, which the current slice's row tiles prefetch into L2:
 * ``rows`` rows of ``ld`` floats apart from ``start`` (NULL: nothing to prefetch), each read over
 * the current slice's K block. Rows of w, or a packed slice seen as rows of its K block: the same lines. */
typedef struct {
  const float* start;
  int64_t rows, ld;
} f32_prefetch;

/* What the weights' pointer of an entry holds (the ``kind`` of the _path entries). */
enum { F32_WEIGHTS_F32 = 0, F32_WEIGHTS_BF16 = 1, F32_WEIGHTS_PACKED = 2 };

/* Packed weights (mlcv_f32_pack_weights) are, on a vector path, its NR-column panels one after the
 * other, each K rows of NR values (the slice layout the register tiles read, for the whole K), the
 * columns past N zero; on the generic path the weights as stored. The panels of every path fit in
 * N rounded up to F32_PACK_COLUMNS columns; a header of F32_PACK_HEADER_FLOATS follows them, naming
 * the path's NR (0: as stored), N and K, so that weights packed for another path or shape are
 * refused instead of read wrongly. */
#define F32_PACK_COLUMNS 64
#define F32_PACK_HEADER_FLOATS 16
#define F32_PACK_MAGIC 0x6b6361705f32336dLL /* "m32_pack" */

static int64_t f32_packed_body_floats(int64_t N, int64_t K) {
  return (N + F32_PACK_COLUMNS - 1) / F32_PACK_COLUMNS * F32_PACK_COLUMNS * K;
}

/* The packing header's NR of ``path``: its panel width, 0 (the weights as stored) on the generic path. */
static int64_t f32_packed_nr(int path) { return path == F32_PATH_GENERIC ? 0 : f32_tile_cols(path); }

/* Whether ``packed`` holds w[N, K] packed for ``path`` (its header says so). */
static int f32_packed_for(const void* packed, int path, int64_t N, int64_t K) {
  int64_t header[4];
  memcpy(header, (const float*)packed + f32_packed_body_floats(N, K), sizeof header);
  return header[0] == F32_PACK_MAGIC && header[1] == f32_packed_nr(path) && header[2] == N && header[3] == K;
}

static inline float f32_weight_at(const f32_weights* w, int64_t i) {
  if (!w->bf16) return ((const float*)w->data)[i];
  uint32_t bits = (uint32_t)((const uint16_t*)w->data)[i] << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* ``count`` (<= 16) bf16 words at ``src`` into ``out``, zero past ``count``: the tail of a row. */
static inline void f32_bf16_tail(const uint16_t* src, int count, uint16_t out[16]) {
  memset(out, 0, 32);
  memcpy(out, src, (size_t)count * 2);
}

/* erf(z) of the vector paths: for |z| < 0.921875 z times a polynomial in z^2 (Taylor series to z^19,
 * ci = 2 / sqrt(pi) (-1)^i / (i! (2i + 1))); above, 1 - erfc(|z|) with erfc(a) = e^(-a^2) t P(t),
 * t = 1 / (1 + a / 2), P's coefficients the Chebyshev fit of Numerical Recipes' erfcc. */
static const float f32_erf_taylor[10] = {1.1283791671f, -0.3761263890f, 0.1128379167f, -0.0268661706f,
                                         0.0052239776f, -0.0008548325f, 0.0001205529f, -0.0000149260f,
                                         0.0000016466f, -0.0000001636f};
static const float f32_erf_cheb[10] = {-1.26551223f, 1.00002368f, 0.37409196f,  0.09678418f, -0.18628806f,
                                       0.27886807f,  -1.13520398f, 1.48851587f, -0.82215223f, 0.17087277f};

/* ------------------------------------------------------------------ generic */

/* Rows [m0, m1) x columns [n0, n0 + ncols) in plain C (any CPU). */
static void f32_rows_generic(const float* x, const f32_weights* w, const f32_epilogue* ep, float* y, int64_t m0,
                             int64_t m1, int64_t n0, int64_t ncols, int64_t N, int64_t K) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n0 + ncols; ++n) {
      const float* a = x + m * K;
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += a[k] * f32_weight_at(w, n * K + k);
      y[m * N + n] = f32_finish_scalar(ep, s, n, m * N + n);
    }
}

/* ------------------------------------------------------------------ AVX-512 */

#if MLCV_X86
#define F32_AVX512 MLCV_TARGET("avx512f")

/* e^x for x in [-87, 88] (clamped outside): x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-7
 * Taylor polynomial (relative error about 2e-8 before rounding), times 2^n. */
F32_AVX512 static inline __m512 f32_exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln2 in two parts */
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

/* 1 / d for d >= 1: the 14-bit estimate and one Newton step (relative error about 1e-8), a
 * fraction of the cost of a vector division. */
F32_AVX512 static inline __m512 f32_reciprocal(__m512 d) {
  __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

/* v * sigmoid(s) = v / (1 + e^-s). */
F32_AVX512 static inline __m512 f32_times_sigmoid(__m512 v, __m512 s) {
  __m512 e = f32_exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), s));
  return _mm512_mul_ps(v, f32_reciprocal(_mm512_add_ps(_mm512_set1_ps(1.0f), e)));
}

/* erf(z) for fp32: |z| < 0.921875 by an odd polynomial in z (Taylor series to z^19, absolute error
 * below 1e-8 there); above, 1 - erfc(|z|) with erfc(a) = e^(-a^2) t P(t), t = 1 / (1 + a / 2) (the
 * Chebyshev fit of Numerical Recipes' erfcc, relative error below 1.2e-7), sign restored. */
F32_AVX512 static inline __m512 f32_erf_avx512(__m512 z) {
  __m512 a = _mm512_abs_ps(z);
  /* small |z|: z (c0 + c1 z^2 + ... ), ci = 2 / sqrt(pi) (-1)^i / (i! (2i + 1)) */
  __m512 z2 = _mm512_mul_ps(z, z);
  __m512 s = _mm512_set1_ps(f32_erf_taylor[9]);
  for (int i = 8; i >= 0; --i) s = _mm512_fmadd_ps(s, z2, _mm512_set1_ps(f32_erf_taylor[i]));
  __m512 small = _mm512_mul_ps(s, z);
  /* large |z| */
  __m512 t = f32_reciprocal(_mm512_fmadd_ps(a, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)));
  __m512 q = _mm512_set1_ps(f32_erf_cheb[9]);
  for (int i = 8; i >= 0; --i) q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(f32_erf_cheb[i]));
  __m512 erfc = _mm512_mul_ps(t, f32_exp_avx512(_mm512_sub_ps(q, _mm512_mul_ps(a, a))));
  __m512 large = _mm512_sub_ps(_mm512_set1_ps(1.0f), erfc);
  __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  large = _mm512_mask_sub_ps(large, negative, _mm512_setzero_ps(), large);
  __mmask16 is_small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.921875f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(is_small, large, small);
}

F32_AVX512 static inline __m512 f32_activation_avx512(int act, __m512 v) {
  switch (act) {
    case F32_ACT_QUICK_GELU: return f32_times_sigmoid(v, _mm512_mul_ps(v, _mm512_set1_ps(1.702f)));
    case F32_ACT_GELU_ERF: {
      __m512 half = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
      return _mm512_fmadd_ps(half, f32_erf_avx512(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f))), half);
    }
    case F32_ACT_GELU_TANH: { /* 0.5 v (1 + tanh(u)) = v sigmoid(2u), u = sqrt(2 / pi) (v + 0.044715 v^3) */
      __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
      __m512 u = _mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v);
      return f32_times_sigmoid(v, _mm512_mul_ps(u, _mm512_set1_ps(2.0f * 0.79788456080286536f)));
    }
    case F32_ACT_SILU: return f32_times_sigmoid(v, v);
    default: return v;
  }
}

/* 16 values of weight row ``n`` from k = ``kb`` (``left`` of them, zeros after) as fp32 bits. */
F32_AVX512 static inline __m512i f32_weight_row_avx512(const f32_weights* w, int64_t n, int64_t K, int64_t kb,
                                                      int left) {
  if (!w->bf16)
    return _mm512_maskz_loadu_epi32((__mmask16)((1u << left) - 1), (const float*)w->data + n * K + kb);
  const uint16_t* src = (const uint16_t*)w->data + n * K + kb;
  uint16_t tail[16];
  if (left < 16) f32_bf16_tail(src, left, tail);
  __m256i h = _mm256_loadu_si256((const __m256i*)(left < 16 ? tail : src));
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}

/* Columns [n0, n0 + NR) x k in [k0, k1) of w[N, K] -> slice[k - k0][NR] (columns >= N are 0), by
 * 16 x 16 register transposes. */
F32_AVX512 static void f32_pack_b(const f32_weights* w, int64_t N, int64_t K, int64_t n0, int64_t k0, int64_t k1,
                                  float* slice) {
  for (int cb = 0; cb < F32_NR; cb += 16) {
    for (int64_t kb = k0; kb < k1; kb += 16) {
      int left = k1 - kb < 16 ? (int)(k1 - kb) : 16;
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        int64_t n = n0 + cb + i;
        r[i] = n < N ? f32_weight_row_avx512(w, n, K, kb, left) : _mm512_setzero_si512();
      }
      mlcv_transpose16x16(r);
      for (int j = 0; j < left; ++j) _mm512_store_si512((__m512i*)(slice + (kb - k0 + j) * F32_NR + cb), r[j]);
    }
  }
}

/* One register tile: ``mr`` rows x NR columns of y at (m, n0), over kc values of k: rows of x at
 * ``a`` (``lda`` floats apart), the weight slice ``b`` (kc rows of NR). ``first``: start from 0,
 * else from the partial sums in y; ``last``: finish with the epilogue. ``next``: the next tile's
 * rows, prefetched into L1 while this one runs. ``pf``: this tile's share of the weight rows the
 * next slice is made of (f32_tile_prefetch, kc values each), prefetched into L2 one cache line per
 * row every 16 k, so that reading them from memory overlaps this slice's FMAs. */
F32_AVX512 __attribute__((always_inline)) static inline void f32_tile(int mr, const float* a, const float* b,
                                                                     const float* next, const f32_epilogue* ep,
                                                                     float* y, int64_t m, int64_t n0,
                                                                     const __mmask16* masks, int64_t N, int64_t lda,
                                                                     int64_t kc, int first, int last,
                                                                     f32_prefetch pf) {
  __m512 acc[F32_MR][F32_NV];
#pragma GCC unroll 16
  for (int r = 0; r < F32_MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < F32_NV; ++j)
      acc[r][j] = (r < mr && !first) ? _mm512_maskz_loadu_ps(masks[j], y + (m + r) * N + n0 + 16 * j)
                                     : _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    if ((k & 15) == 0) {
#pragma GCC unroll 16
      for (int r = 0; r < F32_MR; ++r) _mm_prefetch((const char*)(next + r * lda + k), _MM_HINT_T0);
      for (int r = 0; r < pf.rows; ++r) _mm_prefetch((const char*)(pf.start + r * pf.ld + k), _MM_HINT_T1);
    }
    __m512 bv[F32_NV];
#pragma GCC unroll 8
    for (int j = 0; j < F32_NV; ++j) bv[j] = _mm512_load_ps(b + k * F32_NR + 16 * j);
#pragma GCC unroll 16
    for (int r = 0; r < F32_MR; ++r) {
      if (r < mr) {
        __m512 av = _mm512_set1_ps(a[r * lda + k]);
#pragma GCC unroll 8
        for (int j = 0; j < F32_NV; ++j) acc[r][j] = _mm512_fmadd_ps(av, bv[j], acc[r][j]);
      }
    }
  }
  if (!last) {
    for (int r = 0; r < mr; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < F32_NV; ++j) _mm512_mask_storeu_ps(y + (m + r) * N + n0 + 16 * j, masks[j], acc[r][j]);
    return;
  }
#pragma GCC unroll 8
  for (int j = 0; j < F32_NV; ++j) {
    if (!masks[j]) break;
    __m512 bias = ep->bias ? _mm512_maskz_loadu_ps(masks[j], ep->bias + n0 + 16 * j) : _mm512_setzero_ps();
    __m512 scale = ep->scale ? _mm512_maskz_loadu_ps(masks[j], ep->scale + n0 + 16 * j) : _mm512_setzero_ps();
    for (int r = 0; r < mr; ++r) {
      int64_t at = (m + r) * N + n0 + 16 * j;
      __m512 v = _mm512_add_ps(acc[r][j], bias);
      if (ep->scale) v = _mm512_mul_ps(v, scale);
      if (ep->residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], ep->residual + at));
      if (ep->act != F32_ACT_NONE) v = f32_activation_avx512(ep->act, v);
      if (ep->gate) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(masks[j], ep->gate + at));
      _mm512_mask_storeu_ps(y + at, masks[j], v);
    }
  }
}

/* Rows of ``next`` per row tile when a block's ``tiles`` row tiles share its prefetching. */
static inline int64_t f32_prefetch_per_tile(const f32_prefetch* next, int64_t tiles) {
  return tiles > 0 && next->start ? (next->rows + tiles - 1) / tiles : 0;
}

/* The rows of ``next`` that row tile ``t`` prefetches: ``per_tile`` each, in order, until none are
 * left (none: start NULL). */
static inline f32_prefetch f32_tile_prefetch(const f32_prefetch* next, int64_t t, int64_t per_tile) {
  int64_t left = next->rows - t * per_tile;
  int64_t rows = left <= 0 ? 0 : left < per_tile ? left : per_tile;
  return (f32_prefetch){rows > 0 ? next->start + t * per_tile * next->ld : NULL, rows, next->ld};
}

#define F32_TILE_CASE(R)                                                                             \
  case R:                                                                                            \
    f32_tile(R, a, b, a, ep, y, m, n0, masks, N, lda, kc, first, last,                               \
             f32_tile_prefetch(next, t, per_tile));                                                  \
    break;

/* Rows [m0, m1) x columns [n0, n0 + ncols) (the slice ``b``), one K block of kc; row r of the
 * block is at ``a0 + r * lda``. ``next``: the weights of the slice that follows, which the row tiles
 * prefetch between them (f32_tile). */
F32_AVX512 static void f32_block_avx512(const float* a0, int64_t lda, const float* b, const f32_epilogue* ep,
                                        float* y, int64_t m0, int64_t m1, int64_t n0, int64_t ncols, int64_t N,
                                        int64_t kc, int first, int last, const f32_prefetch* next) {
  __mmask16 masks[F32_NV];
  for (int j = 0; j < F32_NV; ++j) {
    int64_t left = ncols - 16 * j;
    masks[j] = left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
  }
  const int64_t tiles = (m1 - m0 + F32_MR - 1) / F32_MR;
  const int64_t per_tile = f32_prefetch_per_tile(next, tiles);
  int64_t m = m0, t = 0;
  const float* a = a0;
  for (; m + F32_MR <= m1; m += F32_MR, a += F32_MR * lda, ++t)
    f32_tile(F32_MR, a, b, a + F32_MR * lda, ep, y, m, n0, masks, N, lda, kc, first, last,
             f32_tile_prefetch(next, t, per_tile));
  switch (m1 - m) { /* constant row counts: each case is its own unrolled tile */
#if F32_MR > 13
    F32_TILE_CASE(13) F32_TILE_CASE(12) F32_TILE_CASE(11) F32_TILE_CASE(10) F32_TILE_CASE(9) F32_TILE_CASE(8)
#endif
#if F32_MR > 7
    F32_TILE_CASE(7) F32_TILE_CASE(6)
#endif
    F32_TILE_CASE(5) F32_TILE_CASE(4) F32_TILE_CASE(3) F32_TILE_CASE(2) F32_TILE_CASE(1)
    default: break;
  }
}
#endif

/* ------------------------------------------------------------------ AVX2 + FMA */

#if MLCV_X86
#define F32_AVX2 MLCV_TARGET("avx2,fma")

/* Lane masks for _mm256_maskload_ps / _mm256_maskstore_ps: the first ``lanes`` (0..8) of 8. */
static const int32_t f32_lane_mask_table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

F32_AVX2 static inline __m256i f32_lanes_avx2(int64_t lanes) {
  lanes = lanes < 0 ? 0 : lanes > 8 ? 8 : lanes;
  return _mm256_loadu_si256((const __m256i*)(f32_lane_mask_table + 8 - lanes));
}

/* Whether ``mask`` selects all 8 lanes: f32_load_avx2 and f32_store_avx2 then move the vector plainly. */
F32_AVX2 static inline int f32_mask_full_avx2(__m256i mask) { return _mm256_testc_si256(mask, _mm256_set1_epi32(-1)); }

/* The lanes of ``p`` that ``mask`` selects, zeros in the others. Masked loads are slow on AMD Zen 1
 * too (on one, a whole ViT-B/16 library ran 3.7 % faster once the weight packing and the epilogues
 * loaded full vectors plainly), so, as with stores, only a tail is loaded with a mask. */
F32_AVX2 static inline __m256 f32_load_avx2(const float* p, __m256i mask) {
  return f32_mask_full_avx2(mask) ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask);
}

/* ``v`` to the lanes of ``p`` that ``mask`` selects. A masked store (vmaskmovps) is microcoded on AMD
 * Zen 1-3, about a dozen cycles against one for a plain store: with it on every store the attention's
 * 6 x 16 scores tiles (64 k steps each) ran at 65 % of the FMA peak on a Zen 3 core. So full vectors
 * are stored plainly and only a tail is masked. */
F32_AVX2 static inline void f32_store_avx2(float* p, __m256i mask, __m256 v) {
  if (f32_mask_full_avx2(mask))
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, mask, v);
}

/* e^x on ymm: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to r^6 (relative
 * error below 2e-7 there), 2^n made in the exponent bits. n is rounded by adding 1.5 * 2^23 + 127:
 * the sum's low mantissa bits are then n + 127, which a shift by 23 turns into 2^n, so neither a
 * vector round nor a float -> int conversion is needed (the attention ran 1-3 % faster on one Zen 1
 * core without them). The clamp keeps n + 127 in [1, 254]. */
F32_AVX2 static inline __m256 f32_exp_avx2(__m256 x) {
  const __m256 shift = _mm256_set1_ps(12582912.0f + 127.0f);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shift);
  __m256 n = _mm256_sub_ps(t, shift);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x); /* ln2 in two parts */
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  __m256i two_n = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* 1 / d for d >= 1: the 12-bit estimate and one Newton step (relative error about 2e-7). */
F32_AVX2 static inline __m256 f32_reciprocal_avx2(__m256 d) {
  __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

F32_AVX2 static inline __m256 f32_times_sigmoid_avx2(__m256 v, __m256 s) {
  __m256 e = f32_exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), s));
  return _mm256_mul_ps(v, f32_reciprocal_avx2(_mm256_add_ps(_mm256_set1_ps(1.0f), e)));
}

/* erf(z) by the two approximations of f32_erf_avx512. */
F32_AVX2 static inline __m256 f32_erf_avx2(__m256 z) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 a = _mm256_andnot_ps(sign, z);
  __m256 z2 = _mm256_mul_ps(z, z);
  __m256 s = _mm256_set1_ps(f32_erf_taylor[9]);
  for (int i = 8; i >= 0; --i) s = _mm256_fmadd_ps(s, z2, _mm256_set1_ps(f32_erf_taylor[i]));
  __m256 small = _mm256_mul_ps(s, z);
  __m256 t = f32_reciprocal_avx2(_mm256_fmadd_ps(a, _mm256_set1_ps(0.5f), _mm256_set1_ps(1.0f)));
  __m256 q = _mm256_set1_ps(f32_erf_cheb[9]);
  for (int i = 8; i >= 0; --i) q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(f32_erf_cheb[i]));
  __m256 erfc = _mm256_mul_ps(t, f32_exp_avx2(_mm256_sub_ps(q, _mm256_mul_ps(a, a))));
  __m256 large = _mm256_or_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), erfc), _mm256_and_ps(sign, z));
  return _mm256_blendv_ps(large, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.921875f), _CMP_LT_OQ));
}

F32_AVX2 static inline __m256 f32_activation_avx2(int act, __m256 v) {
  switch (act) {
    case F32_ACT_QUICK_GELU: return f32_times_sigmoid_avx2(v, _mm256_mul_ps(v, _mm256_set1_ps(1.702f)));
    case F32_ACT_GELU_ERF: {
      __m256 half = _mm256_mul_ps(v, _mm256_set1_ps(0.5f));
      return _mm256_fmadd_ps(half, f32_erf_avx2(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f))), half);
    }
    case F32_ACT_GELU_TANH: {
      __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
      __m256 u = _mm256_fmadd_ps(v3, _mm256_set1_ps(0.044715f), v);
      return f32_times_sigmoid_avx2(v, _mm256_mul_ps(u, _mm256_set1_ps(2.0f * 0.79788456080286536f)));
    }
    case F32_ACT_SILU: return f32_times_sigmoid_avx2(v, v);
    default: return v;
  }
}

/* 8 bf16 words (raw 16-bit) widened exactly to fp32. */
F32_AVX2 static inline __m256 f32_widen_bf16_avx2(__m128i words) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(words), 16));
}

/* 8 values of weight row ``n`` from k = ``kb`` (``left`` of them, zeros after) in fp32. */
F32_AVX2 static inline __m256 f32_weight_row_avx2(const f32_weights* w, int64_t n, int64_t K, int64_t kb, int left) {
  if (!w->bf16) return f32_load_avx2((const float*)w->data + n * K + kb, f32_lanes_avx2(left));
  const uint16_t* src = (const uint16_t*)w->data + n * K + kb;
  uint16_t tail[16];
  if (left < 8) f32_bf16_tail(src, left, tail);
  return f32_widen_bf16_avx2(_mm_loadu_si128((const __m128i*)(left < 8 ? tail : src)));
}

/* Weight rows n .. n + 7, 8 values each from k = ``kb``, all of them in range: the packing's common
 * case by plain loads, without f32_weight_row_avx2's per-row bounds, masks and tail (with those on
 * every row, packing a 768 x 768 weight took 1.7x as long on an AMD Zen 1). */
F32_AVX2 static inline void f32_weight_rows8_avx2(const f32_weights* w, int64_t n, int64_t K, int64_t kb, __m256 r[8]) {
  if (!w->bf16) {
    const float* src = (const float*)w->data + n * K + kb;
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * K);
    return;
  }
  const uint16_t* src = (const uint16_t*)w->data + n * K + kb;
  for (int i = 0; i < 8; ++i) r[i] = f32_widen_bf16_avx2(_mm_loadu_si128((const __m128i*)(src + i * K)));
}

/* Columns [n0, n0 + 16) x k in [k0, k1) of w[N, K] -> slice[k - k0][16] (columns >= N are 0), by
 * 8 x 8 register transposes. */
F32_AVX2 static void f32_pack_b_avx2(const f32_weights* w, int64_t N, int64_t K, int64_t n0, int64_t k0, int64_t k1,
                                     float* slice) {
  for (int cb = 0; cb < F32_AVX2_NR; cb += 8) {
    for (int64_t kb = k0; kb < k1; kb += 8) {
      int left = k1 - kb < 8 ? (int)(k1 - kb) : 8;
      __m256 r[8];
      if (left == 8 && n0 + cb + 8 <= N) {
        f32_weight_rows8_avx2(w, n0 + cb, K, kb, r);
      } else {
        for (int i = 0; i < 8; ++i) {
          int64_t n = n0 + cb + i;
          r[i] = n < N ? f32_weight_row_avx2(w, n, K, kb, left) : _mm256_setzero_ps();
        }
      }
      mlcv_transpose8x8(r);
      for (int j = 0; j < left; ++j) _mm256_store_ps(slice + (kb - k0 + j) * F32_AVX2_NR + cb, r[j]);
    }
  }
}

/* f32_tile on ymm: ``mr`` rows x 16 columns, the columns of ``masks`` stored. Unlike f32_tile it does
 * not prefetch the next tile's rows of x: with a row stride that is a multiple of 4 KiB (K = 1024,
 * 3072, 4096) those rows and the tile's own share one set of an 8-way L1, and the prefetches evict
 * the lines being read (K = 1024, 3072, 4096 at 74-75 GFLOP/s on one Zen 3 core with them, 88-92
 * without; the other ViT shapes the same either way: the hardware prefetcher follows the rows). */
F32_AVX2 __attribute__((always_inline)) static inline void f32_tile_avx2(int mr, const float* a, const float* b,
                                                                          const f32_epilogue* ep,
                                                                          float* y, int64_t m, int64_t n0,
                                                                          const __m256i* masks, int64_t N, int64_t lda,
                                                                          int64_t kc, int first, int last,
                                                                          f32_prefetch pf) {
  __m256 acc[F32_AVX2_MR][F32_AVX2_NV];
#pragma GCC unroll 6
  for (int r = 0; r < F32_AVX2_MR; ++r)
#pragma GCC unroll 3
    for (int j = 0; j < F32_AVX2_NV; ++j)
      acc[r][j] = (r < mr && !first) ? f32_load_avx2(y + (m + r) * N + n0 + 8 * j, masks[j])
                                     : _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    if ((k & 15) == 0) {
      for (int r = 0; r < pf.rows; ++r) _mm_prefetch((const char*)(pf.start + r * pf.ld + k), _MM_HINT_T1);
    }
    __m256 bv[F32_AVX2_NV];
#pragma GCC unroll 3
    for (int j = 0; j < F32_AVX2_NV; ++j) bv[j] = _mm256_load_ps(b + k * F32_AVX2_NR + 8 * j);
#pragma GCC unroll 6
    for (int r = 0; r < F32_AVX2_MR; ++r) {
      if (r < mr) {
        __m256 av = _mm256_broadcast_ss(a + r * lda + k);
#pragma GCC unroll 3
        for (int j = 0; j < F32_AVX2_NV; ++j) acc[r][j] = _mm256_fmadd_ps(av, bv[j], acc[r][j]);
      }
    }
  }
  /* Constant indices only (unrolled loops, no break): an accumulator indexed at run time would live
   * in memory, and GCC would store every one of them at each k step. */
#pragma GCC unroll 3
  for (int j = 0; j < F32_AVX2_NV; ++j) {
    if (_mm256_testz_si256(masks[j], masks[j])) continue; /* no columns in this vector */
    __m256 bias = ep->bias && last ? f32_load_avx2(ep->bias + n0 + 8 * j, masks[j]) : _mm256_setzero_ps();
    __m256 scale = ep->scale && last ? f32_load_avx2(ep->scale + n0 + 8 * j, masks[j]) : _mm256_setzero_ps();
#pragma GCC unroll 6
    for (int r = 0; r < F32_AVX2_MR; ++r) {
      if (r >= mr) continue;
      int64_t at = (m + r) * N + n0 + 8 * j;
      __m256 v = acc[r][j];
      if (last) {
        v = _mm256_add_ps(v, bias);
        if (ep->scale) v = _mm256_mul_ps(v, scale);
        if (ep->residual) v = _mm256_add_ps(v, f32_load_avx2(ep->residual + at, masks[j]));
        if (ep->act != F32_ACT_NONE) v = f32_activation_avx2(ep->act, v);
        if (ep->gate) v = _mm256_mul_ps(v, f32_load_avx2(ep->gate + at, masks[j]));
      }
      f32_store_avx2(y + at, masks[j], v);
    }
  }
}

#define F32_AVX2_TILE_CASE(R)                                                                          \
  case R:                                                                                              \
    f32_tile_avx2(R, a, b, ep, y, m, n0, masks, N, lda, kc, first, last,                               \
                  f32_tile_prefetch(next, t, per_tile));                                               \
    break;

/* f32_block_avx512 on the 6 x 16 ymm tile. */
F32_AVX2 static void f32_block_avx2(const float* a0, int64_t lda, const float* b, const f32_epilogue* ep, float* y,
                                    int64_t m0, int64_t m1, int64_t n0, int64_t ncols, int64_t N, int64_t kc,
                                    int first, int last, const f32_prefetch* next) {
  __m256i masks[F32_AVX2_NV];
  for (int j = 0; j < F32_AVX2_NV; ++j) masks[j] = f32_lanes_avx2(ncols - 8 * j);
  const int64_t tiles = (m1 - m0 + F32_AVX2_MR - 1) / F32_AVX2_MR;
  const int64_t per_tile = f32_prefetch_per_tile(next, tiles);
  int64_t m = m0, t = 0;
  const float* a = a0;
  for (; m + F32_AVX2_MR <= m1; m += F32_AVX2_MR, a += F32_AVX2_MR * lda, ++t)
    f32_tile_avx2(F32_AVX2_MR, a, b, ep, y, m, n0, masks, N, lda, kc, first, last,
                  f32_tile_prefetch(next, t, per_tile));
  switch (m1 - m) {
    F32_AVX2_TILE_CASE(5) F32_AVX2_TILE_CASE(4) F32_AVX2_TILE_CASE(3) F32_AVX2_TILE_CASE(2) F32_AVX2_TILE_CASE(1)
    default: break;
  }
}
#endif

/* ------------------------------------------------------------------ driver */

/* Linear layers of one input that one job computes, at most: a layer's q, k and v projections. */
#define F32_MAX_PARTS 3

/* One linear layer of the job: its weights [N, K], bias [N] (or NULL) and output [M, N]. */
typedef struct {
  f32_weights w;
  const float* bias;
  float* y;
} f32_part;

/* ``parts`` linear layers of x with the same N and K (one, or siblings without an epilogue past the
 * bias), their panels numbered one part after the other: one split over the threads and one launch
 * for all of them. */
typedef struct {
  int path;
  int64_t mr, nr; /* the path's register tile (f32_tile_rows, f32_tile_cols) */
  const float* x;
  int parts;
  f32_part part[F32_MAX_PARTS];
  f32_epilogue ep; /* its bias is unused: each part has its own */
  int64_t M, N, K, kc;
  int64_t part_panels;               /* NR-column panels of one part */
  int64_t row_block, row_blocks;     /* rows per work unit, and their number */
  int64_t group_panels, groups;      /* NR-column panels per work unit, and their number */
  int64_t next_unit; /* taken with an atomic add: a thread the OS delays takes fewer units */
} f32_job;

/* Panel ``p`` of the job: its part, its first column in that part and its columns (nr, fewer in
 * the last panel of a part). */
static const f32_part* f32_panel(const f32_job* job, int64_t p, int64_t* n0, int64_t* ncols) {
  int64_t part = p / job->part_panels;
  *n0 = (p - part * job->part_panels) * job->nr;
  *ncols = job->N - *n0 < job->nr ? job->N - *n0 : job->nr;
  return &job->part[part];
}

/* Where the fp32 weights of the panel whose first column is ``n0`` start: row n0 of w, or the packed
 * panel (the whole K of it). */
static const float* f32_panel_weights(const f32_job* job, const f32_part* part, int64_t n0) {
  const float* w = (const float*)part->w.data;
  return part->w.packed ? w + n0 / job->nr * job->K * job->nr : w + n0 * job->K;
}

/* Part ``part``'s epilogue. */
static f32_epilogue f32_part_epilogue(const f32_job* job, const f32_part* part) {
  f32_epilogue ep = job->ep;
  ep.bias = part->bias;
  return ep;
}

/* The calling thread's scratch (GEMM weight slices, attention blocks). */
static __thread mlcv_scratch f32_scratch;

static float* f32_scratch_buffer(size_t floats) { return (float*)mlcv_scratch_reserve(&f32_scratch, floats * 4); }

/* A vector path's two steps (same arguments on every path): pack a weight slice, run the row
 * tiles of a block of rows over it (f32_pack_b / f32_block_avx512 and their AVX2 forms). */
typedef void (*f32_pack_fn)(const f32_weights* w, int64_t N, int64_t K, int64_t n0, int64_t k0, int64_t k1,
                            float* slice);
typedef void (*f32_block_fn)(const float* a0, int64_t lda, const float* b, const f32_epilogue* ep, float* y,
                             int64_t m0, int64_t m1, int64_t n0, int64_t ncols, int64_t N, int64_t kc, int first,
                             int last, const f32_prefetch* next);

/* The weights of panel ``p``'s K block from ``k0``, as f32_prefetch rows: kc values of each of its
 * rows of w (K apart), or its packed slice (nr rows of kc values, back to back). */
static f32_prefetch f32_slice_weights(const f32_job* job, int64_t p, int64_t k0) {
  int64_t n0, ncols;
  const f32_part* part = f32_panel(job, p, &n0, &ncols);
  const int64_t kc = job->K - k0 < job->kc ? job->K - k0 : job->kc;
  const float* start = f32_panel_weights(job, part, n0);
  if (part->w.packed) return (f32_prefetch){start + k0 * job->nr, job->nr, kc};
  return (f32_prefetch){start + k0, ncols, job->K};
}

/* What f32_run_unit_vector prefetches while it runs panel ``p``'s K block from ``k0``: the next slice
 * it runs (the next panel, else the unit's first panel in the next K block, else ``after`` in the
 * next unit), when the unit has few rows: then reading the weights from memory is a large part of
 * a slice's time (with more rows it is small, and the prefetched lines compete with x for L2).
 * Weights kept in bf16 are not prefetched. The slices of every K block are prefetched alike (a job
 * has several when a slice of the whole K would not fit in half of L2), under the same row bound
 * (docs/cpu-schedules.md has the measurements). */
static f32_prefetch f32_next_slice(const f32_job* job, int64_t m0, int64_t m1, int64_t p0, int64_t p1, int64_t p,
                                   int64_t k0, int64_t after) {
  const f32_prefetch none = {NULL, 0, 0};
  if (m1 - m0 > F32_PREFETCH_ROWS) return none;
  int64_t next = after, next_k0 = 0;
  if (p + 1 < p1) {
    next = p + 1;
    next_k0 = k0;
  } else if (k0 + job->kc < job->K) {
    next = p0;
    next_k0 = k0 + job->kc;
  }
  if (next < 0 || job->part[next / job->part_panels].w.bf16) return none;
  return f32_slice_weights(job, next, next_k0);
}

/* Rows [m0, m1) x panels [p0, p1) on a vector path. Each panel's weights are packed one K block at
 * a time (the whole K when it fits, see k_block) and used by every row tile of the unit, the
 * accumulators staying in registers over the block. K blocks are the outer loop: the unit's rows
 * of x in one K block are read by every panel, from L2 when they fit. ``after``: the panel that
 * this thread packs next, in its next unit (-1: none), whose weights the last slice prefetches. */
static void f32_run_unit_vector(const f32_job* job, f32_pack_fn pack, f32_block_fn block, float* scratch, int64_t m0,
                                int64_t m1, int64_t p0, int64_t p1, int64_t after) {
  const int64_t N = job->N, K = job->K;
  for (int64_t k0 = 0; k0 < K; k0 += job->kc) {
    int64_t k1 = k0 + job->kc < K ? k0 + job->kc : K;
    for (int64_t p = p0; p < p1; ++p) {
      int64_t n0, ncols;
      const f32_part* part = f32_panel(job, p, &n0, &ncols);
      f32_epilogue ep = f32_part_epilogue(job, part);
      f32_prefetch next = f32_next_slice(job, m0, m1, p0, p1, p, k0, after);
      const float* slice = scratch;
      if (part->w.packed)
        slice = f32_panel_weights(job, part, n0) + k0 * job->nr;
      else
        pack(&part->w, N, K, n0, k0, k1, scratch);
      block(job->x + m0 * K + k0, K, slice, &ep, part->y, m0, m1, n0, ncols, N, k1 - k0, k0 == 0, k1 == K, &next);
    }
  }
}

/* One work unit: rows [m0, m1) x panels [p0, p1) of job->nr columns; ``after`` as f32_run_unit_vector's. */
static void f32_run_unit(const f32_job* job, float* scratch, int64_t m0, int64_t m1, int64_t p0, int64_t p1,
                         int64_t after) {
#if MLCV_X86
  if (job->path == F32_PATH_AVX512) {
    f32_run_unit_vector(job, f32_pack_b, f32_block_avx512, scratch, m0, m1, p0, p1, after);
    return;
  }
  if (job->path == F32_PATH_AVX2) {
    f32_run_unit_vector(job, f32_pack_b_avx2, f32_block_avx2, scratch, m0, m1, p0, p1, after);
    return;
  }
#endif
  (void)scratch;
  (void)after;
  for (int64_t p = p0; p < p1; ++p) {
    int64_t n0, ncols;
    const f32_part* part = f32_panel(job, p, &n0, &ncols);
    f32_epilogue ep = f32_part_epilogue(job, part);
    f32_rows_generic(job->x, &part->w, &ep, part->y, m0, m1, n0, ncols, job->N, job->K);
  }
}

/* One of the pool's tasks: take work units until none are left, each one before the previous one
 * runs, so that the previous one's last panel prefetches the weights of its first. */
static int f32_run_units(f32_job* job) {
  float* scratch = f32_scratch_buffer((size_t)job->kc * job->nr);
  if (scratch == NULL) return -1;
  const int64_t panels = job->parts * job->part_panels, units = job->row_blocks * job->groups;
  int64_t u = __atomic_fetch_add(&job->next_unit, 1, __ATOMIC_RELAXED);
  while (u < units) {
    int64_t next = __atomic_fetch_add(&job->next_unit, 1, __ATOMIC_RELAXED);
    int64_t g = u / job->row_blocks, rb = u % job->row_blocks;
    int64_t m0 = rb * job->row_block, m1 = m0 + job->row_block < job->M ? m0 + job->row_block : job->M;
    int64_t p0 = g * job->group_panels, p1 = p0 + job->group_panels < panels ? p0 + job->group_panels : panels;
    f32_run_unit(job, scratch, m0, m1, p0, p1, next < units ? next / job->row_blocks * job->group_panels : -1);
    u = next;
  }
  return 0;
}

static int f32_parallel_task(int task_id, TVMParallelGroupEnv* penv, void* cdata) {
  (void)task_id;
  (void)penv;
  return f32_run_units((f32_job*)cdata);
}

/* Rows per work unit at most. The weights are packed (read from memory: a model's weights are not
 * in any cache) once per row block, the unit's x rows are read from L2 or L3 once per panel. Against
 * 288-row blocks (x in L2) this measured 3-12 % faster on the ViT shapes with M of 577-1025 and the
 * same at M = 8200 (scripts/dev/f32_gemm_bench.py --cold): the weight traffic is what costs. Weights
 * packed at load (the _packed entries) are read, not packed, once per row block; this bound and the
 * next were measured with the packing in the call and have not been measured again for them. */
#ifndef F32_ROW_BLOCK
#define F32_ROW_BLOCK 1032
#endif

/* Fewest rows per work unit that f32_row_block's L3 bound may leave: with fewer, packing the
 * weights once per row block costs more than reading x from memory (ViT-B/16's MLP output layer,
 * 197 rows in two blocks of 102 instead of one, measured 2 % slower on an AMD Zen 1). */
#ifndef F32_MIN_ROW_BLOCK
#define F32_MIN_ROW_BLOCK 200
#endif

/* Rows per work unit: F32_ROW_BLOCK, or fewer where the x blocks that the threads read at once
 * (rows x kc floats each, read again for every panel) would not fit in half the L3 cache. On an
 * 8 MiB L3 (AMD Zen 1) the SigLIP layers at batch 8 (M = 5832, blocks of 486 or 246 rows instead of
 * 972) ran 1.07x faster so, at batch 1 (729 rows in 2 or 3 blocks) 1.02-1.03x; on the larger L3
 * caches of newer CPUs the bound is above F32_ROW_BLOCK for most layers. */
static int64_t f32_row_block(int64_t kc, int threads) {
  int64_t l3 = l3_bytes();
  if (l3 <= 0) return F32_ROW_BLOCK;
  int64_t rows = l3 / 2 / threads / (kc * 4);
  if (rows > F32_ROW_BLOCK) rows = F32_ROW_BLOCK;
  return rows < F32_MIN_ROW_BLOCK ? F32_MIN_ROW_BLOCK : rows;
}

/* Splits the job into (row block, panel group) units: rows in blocks of at most f32_row_block, then
 * the panels in as many groups as it takes for F32_UNITS_PER_THREAD units per thread, and a number of
 * units that the threads share evenly where the panels allow (9 units on 2 threads leave one thread
 * a ninth of the work alone at the end). */
static void f32_split(f32_job* job, int threads) {
  int64_t most_rows = f32_row_block(job->kc, threads);
  job->row_blocks = (job->M + most_rows - 1) / most_rows;
  job->row_block = (job->M + job->row_blocks - 1) / job->row_blocks;
  if (job->row_block % job->mr) job->row_block += job->mr - job->row_block % job->mr;
  job->row_blocks = (job->M + job->row_block - 1) / job->row_block;
  int64_t panels = job->parts * job->part_panels;
  int64_t want = F32_UNITS_PER_THREAD * (int64_t)threads; /* units */
  int64_t groups = (want + job->row_blocks - 1) / job->row_blocks;
  while (groups < panels && job->row_blocks * groups % threads) ++groups;
  if (groups > panels) groups = panels;
  if (groups < 1) groups = 1;
  job->group_panels = (panels + groups - 1) / groups;
  job->groups = (panels + job->group_panels - 1) / job->group_panels;
}

/* Online CPUs, read once (sysconf reads a file under /sys: microseconds, on every call otherwise). */
static int f32_online_cpus(void) {
  static int known;
  int cpus = __atomic_load_n(&known, __ATOMIC_RELAXED);
  if (cpus == 0) {
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    cpus = online > 0 ? (int)online : 1;
    __atomic_store_n(&known, cpus, __ATOMIC_RELAXED);
  }
  return cpus;
}

/* y_i = epilogue(x . w_i^T) for the ``parts`` layers on ``path`` (more than one: bias only). Returns 0
 * on success. */
static int f32_linear_parts(int path, const float* x, int parts, const f32_part* part, const float* scale,
                            const float* residual, const float* gate, int64_t M, int64_t N, int64_t K, int32_t act) {
  if (!mlcv_f32_path_supported(path) || act < F32_ACT_NONE || act > F32_ACT_SILU) return -1;
  if (residual != NULL && gate != NULL) return -1;
  if (parts < 1 || parts > F32_MAX_PARTS || (parts > 1 && (scale || residual || gate || act))) return -1;
  if (M == 0 || N == 0) return 0;
  int64_t mr = f32_tile_rows(path), nr = f32_tile_cols(path);
  f32_job job = {.path = path, .mr = mr, .nr = nr, .x = x, .parts = parts, .ep = {NULL, scale, residual, gate, act},
                 .M = M, .N = N, .K = K, .kc = k_block(K, nr), .part_panels = (N + nr - 1) / nr};
  for (int i = 0; i < parts; ++i) {
    job.part[i] = part[i];
    if (part[i].w.packed && !f32_packed_for(part[i].w.data, path, N, K)) return -2;
    if (path == F32_PATH_GENERIC) job.part[i].w.packed = 0; /* packed for it: the weights as stored */
  }
  parallel_launch_fn launch = mlcv_thread_pool();
  f32_split(&job, launch != NULL ? f32_online_cpus() : 1);
  if (launch != NULL) return launch(f32_parallel_task, &job, 0);
  return f32_run_units(&job);
}

/* y = epilogue(x . w^T) on ``path``. Returns 0 on success. */
static int f32_linear(int path, const float* x, f32_weights w, const float* bias, const float* scale,
                      const float* residual, const float* gate, float* y, int64_t M, int64_t N, int64_t K, int32_t act) {
  f32_part part = {w, bias, y};
  return f32_linear_parts(path, x, 1, &part, scale, residual, gate, M, N, K, act);
}

/* Weights of ``kind`` (F32_WEIGHTS_*) at ``data``. */
static f32_weights f32_weights_of(const void* data, int kind) {
  f32_weights w = {data, kind == F32_WEIGHTS_BF16, kind == F32_WEIGHTS_PACKED};
  return w;
}

/* ``mlcv_f32_linear``, ``mlcv_f32_linear_bf16w`` and ``mlcv_f32_linear_packed`` on an explicit path
 * (tests run every supported one); ``kind``: what ``w`` holds (F32_WEIGHTS_*). */
int mlcv_f32_linear_path(int path, int kind, const float* x, const void* w, const float* bias, const float* scale,
                         const float* residual, const float* gate, float* y, int64_t M, int64_t N, int64_t K,
                         int32_t act) {
  if (kind < F32_WEIGHTS_F32 || kind > F32_WEIGHTS_PACKED) return -1;
  return f32_linear(path, x, f32_weights_of(w, kind), bias, scale, residual, gate, y, M, N, K, act);
}

/* ``mlcv_f32_linear_group`` on an explicit path, weights of ``kind`` as mlcv_f32_linear_path's. */
int mlcv_f32_linear_group_path(int path, int kind, int parts, const float* x, const void* w0, const void* w1,
                               const void* w2, const float* b0, const float* b1, const float* b2, float* y0,
                               float* y1, float* y2, int64_t M, int64_t N, int64_t K) {
  f32_part part[F32_MAX_PARTS] = {{f32_weights_of(w0, kind), b0, y0}, {f32_weights_of(w1, kind), b1, y1},
                                  {f32_weights_of(w2, kind), b2, y2}};
  if (parts < 2 || kind < F32_WEIGHTS_F32 || kind > F32_WEIGHTS_PACKED) return -1;
  return f32_linear_parts(path, x, parts, part, NULL, NULL, NULL, M, N, K, F32_ACT_NONE);
}

/* Floats that mlcv_f32_pack_weights writes for w[N, K] on any path: the panels and the header. */
int64_t mlcv_f32_packed_floats(int64_t N, int64_t K) { return f32_packed_body_floats(N, K) + F32_PACK_HEADER_FLOATS; }

/* fp32 w[N, K] -> ``packed`` (mlcv_f32_packed_floats(N, K) floats, 64-byte aligned) for ``path``:
 * the weight slices that a call would otherwise pack per work unit, made once. Returns 0 on success,
 * -1 for a path this CPU lacks, a size below 1 or a misaligned ``packed``. */
int mlcv_f32_pack_weights_path(int path, const float* w, float* packed, int64_t N, int64_t K) {
  if (!mlcv_f32_path_supported(path) || N < 1 || K < 1 || ((uintptr_t)packed & 63) != 0) return -1;
  f32_weights weights = f32_weights_of(w, F32_WEIGHTS_F32);
  int64_t nr = f32_packed_nr(path);
  memset(packed, 0, (size_t)mlcv_f32_packed_floats(N, K) * 4);
#if MLCV_X86
  for (int64_t n0 = 0; nr > 0 && n0 < N; n0 += nr) {
    float* panel = packed + n0 * K;
    if (path == F32_PATH_AVX512)
      f32_pack_b(&weights, N, K, n0, 0, K, panel);
    else
      f32_pack_b_avx2(&weights, N, K, n0, 0, K, panel);
  }
#endif
  if (nr == 0) memcpy(packed, w, (size_t)(N * K) * 4);
  int64_t header[4] = {F32_PACK_MAGIC, nr, N, K};
  memcpy(packed + f32_packed_body_floats(N, K), header, sizeof header);
  return 0;
}

/* The entry point the library calls (compiler/passes/f32_cpu.py), on the fastest path here:
 * y = act((x . w^T (+ bias)) (* scale) (+ residual)) (* gate); bias, scale, residual and gate may
 * be NULL (not both residual and gate); ``act``: the F32_ACT_* numbers. */
int mlcv_f32_linear(const float* x, const float* w, const float* bias, const float* scale, const float* residual,
                    const float* gate, float* y, int64_t M, int64_t N, int64_t K, int32_t act) {
  return mlcv_f32_linear_path(mlcv_f32_best_path(), F32_WEIGHTS_F32, x, w, bias, scale, residual, gate, y, M, N, K,
                              act);
}

/* mlcv_f32_linear with the weights packed by mlcv_f32_pack_weights (when the library was loaded):
 * no packing in the call. Returns -2 for weights packed for another path or shape. */
int mlcv_f32_linear_packed(const float* x, const float* packed, const float* bias, const float* scale,
                           const float* residual, const float* gate, float* y, int64_t M, int64_t N, int64_t K,
                           int32_t act) {
  return mlcv_f32_linear_path(mlcv_f32_best_path(), F32_WEIGHTS_PACKED, x, packed, bias, scale, residual, gate, y, M,
                              N, K, act);
}

/* fp32 w[N, K] packed for the fastest path here (mlcv_f32_pack_weights_path): what a library's
 * ``prepack_params`` runs once per linear layer. */
int mlcv_f32_pack_weights(const float* w, float* packed, int64_t N, int64_t K) {
  return mlcv_f32_pack_weights_path(mlcv_f32_best_path(), w, packed, N, K);
}

/* mlcv_f32_linear with bf16 weights (their raw 16-bit words), widened to fp32 as they are packed: the
 * linear layers of bf16 libraries for CPUs without bf16 arithmetic. */
int mlcv_f32_linear_bf16w(const float* x, const uint16_t* w, const float* bias, const float* scale,
                          const float* residual, const float* gate, float* y, int64_t M, int64_t N, int64_t K,
                          int32_t act) {
  return mlcv_f32_linear_path(mlcv_f32_best_path(), F32_WEIGHTS_BF16, x, w, bias, scale, residual, gate, y, M, N,
                              K, act);
}

/* Two or three (``parts``) linear layers of one input x [M, K], weights [N, K] each, as one job:
 * y_i = x . w_i^T (+ b_i), any b_i NULL for none, w2, b2 and y2 unused for two. A layer's q, k and v
 * projections (compiler/passes/f32_cpu.py): one launch and one split over the threads instead of
 * three (at 197 rows, 768 x 768 each, three calls took 1.02-1.03x as long on an AMD Zen 1). */
int mlcv_f32_linear_group(int32_t parts, const float* x, const float* w0, const float* w1, const float* w2,
                          const float* b0, const float* b1, const float* b2, float* y0, float* y1, float* y2,
                          int64_t M, int64_t N, int64_t K) {
  return mlcv_f32_linear_group_path(mlcv_f32_best_path(), F32_WEIGHTS_F32, parts, x, w0, w1, w2, b0, b1, b2, y0, y1,
                                    y2, M, N, K);
}

/* mlcv_f32_linear_group with bf16 weights, as mlcv_f32_linear_bf16w. */
int mlcv_f32_linear_group_bf16w(int32_t parts, const float* x, const uint16_t* w0, const uint16_t* w1,
                                const uint16_t* w2, const float* b0, const float* b1, const float* b2, float* y0,
                                float* y1, float* y2, int64_t M, int64_t N, int64_t K) {
  return mlcv_f32_linear_group_path(mlcv_f32_best_path(), F32_WEIGHTS_BF16, parts, x, w0, w1, w2, b0, b1, b2, y0, y1,
                                    y2, M, N, K);
}

/* mlcv_f32_linear_group with weights packed by mlcv_f32_pack_weights. */
int mlcv_f32_linear_group_packed(int32_t parts, const float* x, const float* w0, const float* w1, const float* w2,
                                 const float* b0, const float* b1, const float* b2, float* y0, float* y1, float* y2,
                                 int64_t M, int64_t N, int64_t K) {
  return mlcv_f32_linear_group_path(mlcv_f32_best_path(), F32_WEIGHTS_PACKED, parts, x, w0, w1, w2, b0, b1, b2, y0,
                                    y1, y2, M, N, K);
}

/* The register tile and K block of the fastest path here (for tests and benchmarks): rows, columns,
 * KC for K. */
void mlcv_f32_tile_info(int64_t K, int64_t* out) {
  int path = mlcv_f32_best_path();
  out[0] = f32_tile_rows(path);
  out[1] = f32_tile_cols(path);
  out[2] = k_block(K, out[1]);
}

/* ------------------------------------------------------------------ attention
 *
 * out = softmax(scale q . k^T) v per (image, head) in fp32; q, k, v and out are [B, S, H, D] (the
 * layout of R.nn.attention), D <= 128. One task per (image, head): k^T (scaled) and v are packed
 * once into contiguous blocks, then ATT_TQ queries at a time:
 *
 *   scores[TQ, SP] = q . k^T   register tiles of 6 queries x 64 keys, k^T[D, 64] panels in L1;
 *   softmax rows in place      max, exp, sum over the S real keys;
 *   out[TQ, D] = p . v / sum   register tiles of R queries x D (R = 6, 4 or 3 by D).
 *
 * Packing v matters: its rows are H * D floats apart in memory, a multiple of 4 KiB for 16 heads
 * of 64, which would put every row of a head on the same L1 sets.
 */

#define ATT_TQ 48   /* queries per block: a multiple of every tile's rows (6, 4, 3) */
#define ATT_KEYS 64 /* keys per scores tile: 4 zmm */
#define ATT_MAX_D 128

typedef struct {
  int path;
  const float *q, *k, *v;
  float* out;
  int64_t B, S, H, D;
  float scale;
  int64_t next_task;
} f32_attention_job;

static int64_t att_round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/* Head (b, h) in plain fp32 (any CPU). */
static void f32_attention_generic(const f32_attention_job* job, int64_t b, int64_t h, float* p) {
  const int64_t S = job->S, H = job->H, D = job->D;
  for (int64_t i = 0; i < S; ++i) {
    const float* qi = job->q + ((b * S + i) * H + h) * D;
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < S; ++j) {
      const float* kj = job->k + ((b * S + j) * H + h) * D;
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += qi[d] * kj[d];
      p[j] = s * job->scale;
      mx = p[j] > mx ? p[j] : mx;
    }
    for (int64_t j = 0; j < S; ++j) sum += (p[j] = expf(p[j] - mx));
    float* o = job->out + ((b * S + i) * H + h) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
    for (int64_t j = 0; j < S; ++j) {
      const float* vj = job->v + ((b * S + j) * H + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] += p[j] * vj[d];
    }
    for (int64_t d = 0; d < D; ++d) o[d] /= sum;
  }
}

#if MLCV_X86
/* k of head (b, h) -> kt[SP / 64][D][64]: panels of 64 keys, each a contiguous D x 64 block (rows
 * SP floats apart would share L1 sets), scaled; keys >= S are 0. By 16 x 16 transposes. */
F32_AVX512 static void att_pack_kt(const f32_attention_job* job, int64_t b, int64_t h, int64_t SP, float* kt) {
  const int64_t S = job->S, H = job->H, D = job->D;
  __m512 scale = _mm512_set1_ps(job->scale);
  for (int64_t s0 = 0; s0 < SP; s0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      int left = D - d0 < 16 ? (int)(D - d0) : 16;
      __mmask16 mask = (__mmask16)((1u << left) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        int64_t s = s0 + i;
        r[i] = s < S ? _mm512_castps_si512(_mm512_mul_ps(
                           _mm512_maskz_loadu_ps(mask, job->k + ((b * S + s) * H + h) * D + d0), scale))
                     : _mm512_setzero_si512();
      }
      mlcv_transpose16x16(r);
      float* panel = kt + (s0 / ATT_KEYS) * D * ATT_KEYS + s0 % ATT_KEYS;
      for (int j = 0; j < left; ++j) _mm512_store_si512((__m512i*)(panel + (d0 + j) * ATT_KEYS), r[j]);
    }
}

/* v of head (b, h) -> vp[S][DP], rows padded with zeros to DP floats. */
F32_AVX512 static void att_pack_v(const f32_attention_job* job, int64_t b, int64_t h, int64_t DP, float* vp) {
  const int64_t S = job->S, H = job->H, D = job->D;
  for (int64_t s = 0; s < S; ++s) {
    const float* src = job->v + ((b * S + s) * H + h) * D;
    for (int64_t d0 = 0; d0 < DP; d0 += 16) {
      int64_t left = D - d0;
      __mmask16 mask = left >= 16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
      _mm512_store_ps(vp + s * DP + d0, _mm512_maskz_loadu_ps(mask, src + d0));
    }
  }
}

/* scores[r][keys] for 6 query rows (``qp``, D floats apart) x the first 16 NV of the 64 keys of the
 * kt panel ``kp`` (the last panel computes only the vectors that hold keys < S). */
F32_AVX512 __attribute__((always_inline)) static inline void att_scores_tile(int NV, const float* qp, const float* kp,
                                                                             int64_t SP, int64_t D, float* scores) {
  __m512 acc[6][4];
#pragma GCC unroll 6
  for (int r = 0; r < 6; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 bv[4];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_load_ps(kp + d * ATT_KEYS + 16 * j);
#pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
      __m512 a = _mm512_set1_ps(qp[r * D + d]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(a, bv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < 6; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_store_ps(scores + r * SP + 16 * j, acc[r][j]);
}

/* The scores of rows [0, tq) of the query block x every key panel; a panel's 16-key vectors past
 * the last key are not computed (nor read: the softmax and p . v stop at key S). */
F32_AVX512 static void att_scores_block(const float* qp, const float* kt, int64_t S, int64_t SP, int64_t D,
                                        int64_t tq, float* scores) {
  for (int64_t kp = 0; kp < SP; kp += ATT_KEYS) {
    int64_t keys = S - kp < ATT_KEYS ? S - kp : ATT_KEYS;
    int nv = (int)((keys + 15) / 16);
    for (int64_t r0 = 0; r0 < tq; r0 += 6) {
      const float* q = qp + r0 * D;
      const float* k = kt + kp * D;
      float* out = scores + r0 * SP + kp;
      switch (nv) { /* constant vector counts: each case is its own unrolled tile */
        case 1: att_scores_tile(1, q, k, SP, D, out); break;
        case 2: att_scores_tile(2, q, k, SP, D, out); break;
        case 3: att_scores_tile(3, q, k, SP, D, out); break;
        default: att_scores_tile(4, q, k, SP, D, out); break;
      }
    }
  }
}

/* Row ``row`` (SP floats) -> exp(row - max) over the S real keys, in place; returns the sum. */
F32_AVX512 static float att_softmax_row(float* row, int64_t S) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t s = 0; s < S; s += 16) {
    __mmask16 mask = S - s >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - s)) - 1);
    mx = _mm512_mask_max_ps(mx, mask, mx, _mm512_loadu_ps(row + s));
  }
  __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; s += 16) {
    __mmask16 mask = S - s >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - s)) - 1);
    __m512 e = _mm512_maskz_mov_ps(mask, f32_exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(row + s), m)));
    _mm512_mask_storeu_ps(row + s, mask, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

/* out rows = (p . v) / sum for R query rows (probabilities ``p``, SP floats apart) x NV vectors of
 * the head dim (the packed v, DP floats a row); output rows ``ld`` floats apart; rows >= ``valid``
 * are computed but not stored. */
F32_AVX512 __attribute__((always_inline)) static inline void att_pv_tile(int R, int NV, const float* p, int64_t SP,
                                                                         const float* vp, int64_t DP, int64_t S,
                                                                         const float* inv_sum, float* out, int64_t ld,
                                                                         int64_t D, int valid) {
  __m512 acc[6][8];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    __m512 bv[8];
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_load_ps(vp + s * DP + 16 * j);
    for (int r = 0; r < R; ++r) {
      __m512 a = _mm512_set1_ps(p[r * SP + s]);
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(a, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R && r < valid; ++r) {
    __m512 inv = _mm512_set1_ps(inv_sum[r]);
    for (int j = 0; j < NV; ++j) {
      int64_t left = D - 16 * j;
      __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
      _mm512_mask_storeu_ps(out + r * ld + 16 * j, mask, _mm512_mul_ps(acc[r][j], inv));
    }
  }
}

#define ATT_PV_CASE(NV_, R_)                                                                          \
  case NV_:                                                                                           \
    for (int64_t r0 = 0; r0 < tq; r0 += R_)                                                           \
      att_pv_tile(R_, NV_, scores + r0 * SP, SP, vp, DP, S, inv_sum + r0,                             \
                  job->out + ((b * S + q0 + r0) * H + h) * D, H * D, D, (int)(tq - r0));               \
    break;

/* Head (b, h) on the AVX-512 register tiles; ``scratch``: kt, scores, vp, the query block, 1 / sums.
 * The scores block is zeroed first: the rows past the last query that a tile computes but does not
 * store then hold finite values. */
F32_AVX512 static void f32_attention_avx512(const f32_attention_job* job, int64_t b, int64_t h, float* scratch) {
  const int64_t S = job->S, H = job->H, D = job->D;
  const int64_t SP = att_round_up(S, ATT_KEYS), DP = att_round_up(D, 16);
  float* kt = scratch;
  float* scores = kt + D * SP;
  float* vp = scores + ATT_TQ * SP;
  float* qp = vp + S * DP;
  float* inv_sum = qp + ATT_TQ * D;
  att_pack_kt(job, b, h, SP, kt);
  att_pack_v(job, b, h, DP, vp);
  memset(scores, 0, sizeof(float) * ATT_TQ * SP);
  memset(qp, 0, sizeof(float) * ATT_TQ * D);
  for (int64_t q0 = 0; q0 < S; q0 += ATT_TQ) {
    int64_t tq = S - q0 < ATT_TQ ? S - q0 : ATT_TQ;
    for (int64_t r = 0; r < tq; ++r) memcpy(qp + r * D, job->q + ((b * S + q0 + r) * H + h) * D, sizeof(float) * D);
    att_scores_block(qp, kt, S, SP, D, tq, scores);
    for (int64_t r = 0; r < tq; ++r) inv_sum[r] = 1.0f / att_softmax_row(scores + r * SP, S);
    switch (DP / 16) {
      ATT_PV_CASE(1, 6) ATT_PV_CASE(2, 6) ATT_PV_CASE(3, 6) ATT_PV_CASE(4, 6)
      ATT_PV_CASE(5, 4) ATT_PV_CASE(6, 4) ATT_PV_CASE(7, 3) ATT_PV_CASE(8, 3)
      default: break;
    }
  }
}
/* The AVX2 + FMA attention: the same blocks on ymm tiles, keys in panels of 16 (kt[SP / 16][D][16],
 * SP a multiple of 16), v rows padded to DP8 = D rounded up to 8; q . k^T and p . v on 6 x 16 tiles. */
#define ATT_AVX2_KEYS 16

/* k of head (b, h) -> kt panels of 16 keys, scaled; keys >= S are 0. By 8 x 8 transposes. */
F32_AVX2 static void att_pack_kt_avx2(const f32_attention_job* job, int64_t b, int64_t h, int64_t SP, float* kt) {
  const int64_t S = job->S, H = job->H, D = job->D;
  __m256 scale = _mm256_set1_ps(job->scale);
  for (int64_t s0 = 0; s0 < SP; s0 += 8)
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      int left = D - d0 < 8 ? (int)(D - d0) : 8;
      __m256i mask = f32_lanes_avx2(left);
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        int64_t s = s0 + i;
        r[i] = s < S ? _mm256_mul_ps(f32_load_avx2(job->k + ((b * S + s) * H + h) * D + d0, mask), scale)
                     : _mm256_setzero_ps();
      }
      mlcv_transpose8x8(r);
      float* panel = kt + (s0 / ATT_AVX2_KEYS) * D * ATT_AVX2_KEYS + s0 % ATT_AVX2_KEYS;
      for (int j = 0; j < left; ++j) _mm256_store_ps(panel + (d0 + j) * ATT_AVX2_KEYS, r[j]);
    }
}

/* v of head (b, h) -> vp[S][DP8], rows padded with zeros. */
F32_AVX2 static void att_pack_v_avx2(const f32_attention_job* job, int64_t b, int64_t h, int64_t DP8, float* vp) {
  const int64_t S = job->S, H = job->H, D = job->D;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t d0 = 0; d0 < DP8; d0 += 8)
      _mm256_store_ps(vp + s * DP8 + d0, f32_load_avx2(job->v + ((b * S + s) * H + h) * D + d0,
                                                            f32_lanes_avx2(D - d0)));
}

/* 6 rows x 8 ``nv`` columns (nv 1 or 2, a constant at each call): acc = sum over ``steps`` of
 * a[r * lda + i] * b[i * ldb + 0..8 nv - 1]; the columns scaled by ``row_scale[r]`` (when not NULL) and
 * stored to out (``ld`` floats a row; rows >= ``valid`` and columns past ``masks`` are not stored).
 * Both of the attention's products; nv = 1 for a last block of at most 8 columns of v (head dim 72:
 * 4 x 16 + 8), which would otherwise spend half its FMAs on columns that are not stored. */
F32_AVX2 __attribute__((always_inline)) static inline void att_tile_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t steps,
                                   const float* row_scale, float* out, int64_t ld, int valid, const __m256i* masks,
                                   int nv) {
  __m256 acc[6][2];
#pragma GCC unroll 6
  for (int r = 0; r < 6; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < steps; ++i) {
    __m256 b0 = _mm256_load_ps(b + i * ldb), b1 = nv > 1 ? _mm256_load_ps(b + i * ldb + 8) : b0;
#pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
      __m256 av = _mm256_broadcast_ss(a + r * lda + i);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      if (nv > 1) acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < 6; ++r) { /* constant indices: see f32_tile_avx2 */
    if (r >= valid) continue;
    __m256 s = _mm256_set1_ps(row_scale ? row_scale[r] : 1.0f);
    f32_store_avx2(out + r * ld, masks[0], _mm256_mul_ps(acc[r][0], s));
    if (nv > 1) f32_store_avx2(out + r * ld + 8, masks[1], _mm256_mul_ps(acc[r][1], s));
  }
}

/* att_softmax_row on ymm. */
F32_AVX2 static float att_softmax_row_avx2(float* row, int64_t S) {
  __m256 mx = _mm256_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(row + s));
  float lanes[8];
  _mm256_storeu_ps(lanes, mx);
  float m = lanes[0];
  for (int i = 1; i < 8; ++i) m = lanes[i] > m ? lanes[i] : m;
  for (; s < S; ++s) m = row[s] > m ? row[s] : m;
  __m256 mv = _mm256_set1_ps(m), sum = _mm256_setzero_ps();
  for (s = 0; s + 8 <= S; s += 8) {
    __m256 e = f32_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + s), mv));
    _mm256_storeu_ps(row + s, e);
    sum = _mm256_add_ps(sum, e);
  }
  _mm256_storeu_ps(lanes, sum);
  float total = 0.0f;
  for (int i = 0; i < 8; ++i) total += lanes[i];
  for (; s < S; ++s) total += (row[s] = expf(row[s] - m));
  return total;
}

/* Head (b, h) on the ymm tiles; ``scratch`` as f32_attention_avx512's (its sizes bound these). */
F32_AVX2 static void f32_attention_avx2(const f32_attention_job* job, int64_t b, int64_t h, float* scratch) {
  const int64_t S = job->S, H = job->H, D = job->D;
  const int64_t SP = att_round_up(S, ATT_AVX2_KEYS), DP8 = att_round_up(D, 8);
  float* kt = scratch;
  float* scores = kt + D * SP;
  float* vp = scores + ATT_TQ * SP;
  float* qp = vp + S * DP8;
  float* inv_sum = qp + ATT_TQ * D;
  const __m256i all[2] = {f32_lanes_avx2(8), f32_lanes_avx2(8)};
  att_pack_kt_avx2(job, b, h, SP, kt);
  att_pack_v_avx2(job, b, h, DP8, vp);
  memset(scores, 0, sizeof(float) * ATT_TQ * SP);
  memset(qp, 0, sizeof(float) * ATT_TQ * D);
  for (int64_t q0 = 0; q0 < S; q0 += ATT_TQ) {
    int64_t tq = S - q0 < ATT_TQ ? S - q0 : ATT_TQ;
    for (int64_t r = 0; r < tq; ++r) memcpy(qp + r * D, job->q + ((b * S + q0 + r) * H + h) * D, sizeof(float) * D);
    for (int64_t kp = 0; kp < SP; kp += ATT_AVX2_KEYS)
      for (int64_t r0 = 0; r0 < tq; r0 += 6)
        att_tile_avx2(qp + r0 * D, D, kt + kp * D, ATT_AVX2_KEYS, D, NULL, scores + r0 * SP + kp, SP, 6, all, 2);
    for (int64_t r = 0; r < tq; ++r) inv_sum[r] = 1.0f / att_softmax_row_avx2(scores + r * SP, S);
    /* p . v, row tiles outer: a tile's 6 rows of probabilities stay in L1 for every 16 columns of v;
     * a last block of at most 8 columns (the only one that can end past DP8) on the 8-column tile. */
    for (int64_t r0 = 0; r0 < tq; r0 += 6)
      for (int64_t c0 = 0; c0 < D; c0 += 16) {
        __m256i masks[2] = {f32_lanes_avx2(D - c0), f32_lanes_avx2(D - c0 - 8)};
        const float* p = scores + r0 * SP;
        float* o = job->out + ((b * S + q0 + r0) * H + h) * D + c0;
        if (D - c0 > 8)
          att_tile_avx2(p, SP, vp + c0, DP8, S, inv_sum + r0, o, H * D, (int)(tq - r0), masks, 2);
        else
          att_tile_avx2(p, SP, vp + c0, DP8, S, inv_sum + r0, o, H * D, (int)(tq - r0), masks, 1);
      }
  }
}
#endif

/* Floats of one task's scratch (the AVX-512 layout; the AVX2 one is smaller). */
static size_t att_scratch_floats(const f32_attention_job* job) {
  int64_t SP = att_round_up(job->S, ATT_KEYS), DP = att_round_up(job->D, 16);
  return (size_t)(job->D * SP + ATT_TQ * SP + job->S * DP + ATT_TQ * job->D + ATT_TQ + 16);
}

static int f32_attention_tasks(f32_attention_job* job) {
  size_t floats = job->path != F32_PATH_GENERIC ? att_scratch_floats(job) : (size_t)job->S;
  float* scratch = f32_scratch_buffer(floats);
  if (scratch == NULL) return -1;
  for (;;) {
    int64_t t = __atomic_fetch_add(&job->next_task, 1, __ATOMIC_RELAXED);
    if (t >= job->B * job->H) break;
    int64_t b = t / job->H, h = t % job->H;
#if MLCV_X86
    if (job->path == F32_PATH_AVX512) {
      f32_attention_avx512(job, b, h, scratch);
      continue;
    }
    if (job->path == F32_PATH_AVX2) {
      f32_attention_avx2(job, b, h, scratch);
      continue;
    }
#endif
    f32_attention_generic(job, b, h, scratch);
  }
  return 0;
}

static int f32_attention_task(int task_id, TVMParallelGroupEnv* penv, void* cdata) {
  (void)task_id;
  (void)penv;
  return f32_attention_tasks((f32_attention_job*)cdata);
}

/* out = softmax(scale q . k^T) v with an explicit path (tests run every supported one); q, k, v,
 * out fp32 [B, S, H, D], D <= 128. Returns 0 on success. */
int mlcv_f32_attention_path(int path, const float* q, const float* k, const float* v, float* out, int64_t B,
                            int64_t S, int64_t H, int64_t D, float scale) {
  if (!mlcv_f32_path_supported(path) || D < 1 || D > ATT_MAX_D) return -1;
  if (B == 0 || S == 0 || H == 0) return 0;
  f32_attention_job job = {path, q, k, v, out, B, S, H, D, scale, 0};
  parallel_launch_fn launch = mlcv_thread_pool();
  if (launch != NULL) return launch(f32_attention_task, &job, 0);
  return f32_attention_tasks(&job);
}

/* The entry point fp32 libraries call for R.nn.attention (compiler/passes/f32_cpu.py). */
int mlcv_f32_attention(const float* q, const float* k, const float* v, float* out, int64_t B, int64_t S, int64_t H,
                       int64_t D, float scale) {
  return mlcv_f32_attention_path(mlcv_f32_best_path(), q, k, v, out, B, S, H, D, scale);
}
