/*
 * Segmented attention for CPU libraries (native-resolution towers: per image, per window).
 *
 *   out[i, h] = sum_j softmax_j(q[i, h] . k[j, h] * scale) v[j, h]   over the keys j with seg[j] == seg[i]
 *
 * q, k, v and out are fp32 [n, heads, head_dim] (row-major, the layout of the
 * qkv projection split by head); seg is int32 [n]. The segments must be
 * contiguous runs, i.e. seg non-decreasing along the sequence: the runtime
 * numbers images and windows in the order attention sees them (window
 * order), so every image and every window is one run. A decreasing id makes
 * the call fail (SEGMENTS_NOT_SORTED) instead of attending across runs.
 *
 * Work: one unit is (segment, block of QB queries, head); units are taken one
 * at a time from an atomic counter by the threads of TVM's pool. A unit runs
 * flash-style attention over the segment's keys in blocks of KB: scores of
 * QB x KB in a local buffer, an online softmax (running max and sum per query,
 * the accumulator rescaled when the max grows), all in fp32, so a segment of
 * any length (a window of 64 patches, a whole image of thousands) needs only
 * the unit's buffers. Scores are kept in base 2: q is scaled by
 * scale * log2(e) when loaded, so p = 2^(s - max).
 *
 * The register tiles use GCC/Clang vector extensions. Their width must be
 * the machine's (GCC splits wider vectors into scalar code), so the vector
 * code below (between the MLCV_VECTOR_CODE guards) is compiled once per
 * instruction set: this file includes itself with the lane count, target
 * attribute and tile sizes of each path (C has no templates; the FN macro
 * gives each copy's functions their own names). AVX-512 (16 lanes), AVX2 + FMA
 * and baseline (8 lanes); the path is picked from the CPU at run time, so the
 * object runs on any x86-64 CPU (and on other CPUs with the baseline path).
 * Compiled with the host C compiler at export (cpu_segment_attention.py) and
 * linked into the library.
 */

#ifndef MLCV_VECTOR_CODE

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* MLCV_X86, the thread pool, and MLCV_TARGET / MLCV_EMULATED: in the emulated test build the paths
 * are compiled without their target features (the compiler splits their vectors into baseline ones)
 * and all reported present, so the AVX-512 path's tiles run on any x86-64 CPU. */
#include "cpu_kernels.h" /* found beside this file */

enum { PATH_GENERIC = 0, PATH_AVX2 = 1, PATH_AVX512 = 2 };
enum { OK = 0, OUT_OF_MEMORY = -1, SEGMENTS_NOT_SORTED = -2, BAD_HEAD_DIM = -3 };

#define QB 32          /* queries per unit */
#define KB 64          /* keys per block */
#define MAX_HEAD_DIM 128
#define LOG2_E 1.44269504088896341f
#define EXP2_MIN -126.0f /* 2^x below this is taken as 2^-126 (a masked key, or the start of a row) */
#define MASKED_SCORE -1.0e30f

#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* Vectors only live inside each path's worker (everything is inlined), so no call passes one. */
#pragma GCC diagnostic ignored "-Wpsabi"

/* One unit's state: its queries scaled into base 2, the running max / sum, the output accumulator. */
typedef struct {
  float q[QB * MAX_HEAD_DIM] __attribute__((aligned(64)));
  float kt[MAX_HEAD_DIM * KB] __attribute__((aligned(64))); /* k block transposed: [c][key] */
  float vb[KB * MAX_HEAD_DIM] __attribute__((aligned(64))); /* v block, rows padded to whole vectors */
  float s[QB * KB] __attribute__((aligned(64)));            /* scores, then probabilities */
  float acc[QB * MAX_HEAD_DIM] __attribute__((aligned(64)));
  float max[QB], sum[QB];
} unit_buffers;

typedef struct {
  const float *q, *k, *v;
  float* out;
  int64_t heads, head_dim;
  float scale;
  const int64_t* blocks; /* per query block: first query, end of the block, segment start, segment end */
  int64_t num_blocks;
  int path;
  int64_t next_unit;
} attention_job;

/* Copy the key block [k0, k0 + keys) of head h: k transposed into kt (0 past ``keys``), v rows into vb. */
ALWAYS_INLINE void load_key_block(unit_buffers* b, const attention_job* job, int64_t h, int64_t k0, int keys) {
  int64_t d = job->head_dim, row = job->heads * d;
  for (int j = 0; j < KB; ++j) {
    const float* kj = job->k + (k0 + (j < keys ? j : 0)) * row + h * d;
    for (int64_t c = 0; c < d; ++c) b->kt[c * KB + j] = j < keys ? kj[c] : 0.0f;
  }
  for (int j = 0; j < keys; ++j) memcpy(b->vb + j * MAX_HEAD_DIM, job->v + (k0 + j) * row + h * d, d * sizeof(float));
}

#define CONCAT_(a, b) a##_##b
#define CONCAT(a, b) CONCAT_(a, b)
#define FN(name) CONCAT(name, PATH_NAME)
#define MLCV_VECTOR_CODE

/* AVX-512: 16 lanes, 32 registers: score tiles of 4 rows x 4 vectors, context tiles of up to 24 vectors. */
#define LANES 16
#define PATH_NAME avx512
#define PATH_TARGET MLCV_TARGET("avx512f,avx512dq,fma")
#define SCORE_ROWS 4
#define CONTEXT_ACCUMULATORS 24
#if MLCV_X86
#include "cpu_segment_attention.c" /* this file, found beside itself */
#endif
#undef LANES
#undef PATH_NAME
#undef PATH_TARGET
#undef SCORE_ROWS
#undef CONTEXT_ACCUMULATORS

/* AVX2 + FMA: 8 lanes, 16 registers: one score row of 8 vectors, context tiles of up to 12 vectors. */
#define LANES 8
#define PATH_NAME avx2
#define PATH_TARGET MLCV_TARGET("avx2,fma")
#define SCORE_ROWS 1
#define CONTEXT_ACCUMULATORS 12
#if MLCV_X86
#include "cpu_segment_attention.c" /* this file, found beside itself */
#endif
#undef PATH_NAME
#undef PATH_TARGET

/* Baseline: the AVX2 tiles in whatever vectors the compiler's default target has. */
#define PATH_NAME generic
#define PATH_TARGET
#include "cpu_segment_attention.c" /* this file, found beside itself */

static int path_supported(int path) {
#if MLCV_X86
  if (MLCV_EMULATED) return 1;
  __builtin_cpu_init();
  if (path == PATH_AVX512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  if (path == PATH_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return path == PATH_GENERIC;
}

static int run_worker(attention_job* job) {
#if MLCV_X86
  if (job->path == PATH_AVX512) return worker_avx512(job);
  if (job->path == PATH_AVX2) return worker_avx2(job);
#endif
  return worker_generic(job);
}

static int parallel_task(int task_id, TVMParallelGroupEnv* penv, void* cdata) {
  (void)task_id;
  (void)penv;
  return run_worker((attention_job*)cdata);
}

/* Query blocks of every run of equal ids: 4 int64 each (first query, end, segment start, segment end). */
static int64_t* query_blocks(const int32_t* seg, int64_t n, int64_t* count) {
  int64_t blocks = 0;
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && seg[j] == seg[i]) ++j;
    blocks += (j - i + QB - 1) / QB;
    i = j;
  }
  int64_t* out = malloc((size_t)(blocks ? blocks : 1) * 4 * sizeof(int64_t));
  if (out == NULL) return NULL;
  int64_t b = 0;
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && seg[j] == seg[i]) ++j;
    for (int64_t q0 = i; q0 < j; q0 += QB, ++b) {
      out[4 * b] = q0;
      out[4 * b + 1] = q0 + QB < j ? q0 + QB : j;
      out[4 * b + 2] = i;
      out[4 * b + 3] = j;
    }
    i = j;
  }
  *count = blocks;
  return out;
}

static int segments_sorted(const int32_t* seg, int64_t n) {
  for (int64_t i = 1; i < n; ++i)
    if (seg[i] < seg[i - 1]) return 0;
  return 1;
}

int mlcv_segment_attention_path_supported(int path) { return path_supported(path); }

int mlcv_segment_attention_best_path(void) {
  if (path_supported(PATH_AVX512)) return PATH_AVX512;
  if (path_supported(PATH_AVX2)) return PATH_AVX2;
  return PATH_GENERIC;
}

/* The attention with an explicit path (tests run every supported one; an unsupported one runs the
 * baseline). Returns 0 or a negative code. */
int mlcv_segment_attention_path(int path, const float* q, const float* k, const float* v, const int32_t* seg,
                                float* out, int64_t n, int64_t heads, int64_t head_dim, float scale) {
  if (head_dim < 1 || head_dim > MAX_HEAD_DIM) return BAD_HEAD_DIM;
  if (!path_supported(path)) path = PATH_GENERIC;
  if (!segments_sorted(seg, n)) return SEGMENTS_NOT_SORTED;
  if (n == 0 || heads == 0) return OK;
  attention_job job = {q, k, v, out, heads, head_dim, scale, NULL, 0, path, 0};
  int64_t* blocks = query_blocks(seg, n, &job.num_blocks);
  if (blocks == NULL) return OUT_OF_MEMORY;
  job.blocks = blocks;
  parallel_launch_fn launch = mlcv_thread_pool();
  int status = launch != NULL ? launch(parallel_task, &job, 0) : run_worker(&job);
  free(blocks);
  return status == 0 ? OK : OUT_OF_MEMORY;
}

/* The entry the library calls (compiler/passes/segment_attention.py), on the fastest path here. */
int mlcv_segment_attention(const float* q, const float* k, const float* v, const int32_t* seg, float* out, int64_t n,
                           int64_t heads, int64_t head_dim, float scale) {
  return mlcv_segment_attention_path(mlcv_segment_attention_best_path(), q, k, v, seg, out, n, heads, head_dim, scale);
}

#else /* MLCV_VECTOR_CODE: one path's vector code (LANES, PATH_NAME, PATH_TARGET, SCORE_ROWS, CONTEXT_ACCUMULATORS) */

#define VEC FN(vec)
#define IVEC FN(ivec)
#define KEY_VECTORS (KB / LANES)
#define MAX_VECTORS (MAX_HEAD_DIM / LANES)
typedef float VEC __attribute__((vector_size(4 * LANES), aligned(4)));
typedef int32_t IVEC __attribute__((vector_size(4 * LANES), aligned(4)));

ALWAYS_INLINE VEC FN(splat)(float x) { return (VEC){0} + x; }
ALWAYS_INLINE VEC FN(load)(const float* p) { return *(const VEC*)p; }
ALWAYS_INLINE void FN(store)(float* p, VEC x) { *(VEC*)p = x; }
ALWAYS_INLINE VEC FN(vmax)(VEC a, VEC b) {
  IVEC take_a = (IVEC)(a > b); /* all ones where a > b */
  return (VEC)(((IVEC)a & take_a) | ((IVEC)b & ~take_a));
}

/* 2^x for x <= 0, relative error about 1e-7: x = n + f with n = round(x), f in [-1/2, 1/2], 2^f by the
 * degree-7 Taylor polynomial of e^(f ln 2), 2^n from the exponent bits. Below EXP2_MIN it is 2^-126. */
ALWAYS_INLINE VEC FN(exp2_neg)(VEC x) {
  x = FN(vmax)(x, FN(splat)(EXP2_MIN));
  VEC up = x + 0.5f;
  IVEC n = __builtin_convertvector(up, IVEC);            /* truncates toward zero: n >= up for up <= 0 */
  n = n + (IVEC)(__builtin_convertvector(n, VEC) > up); /* the comparison is -1 where true: floor(up) */
  VEC f = x - __builtin_convertvector(n, VEC);
  VEC p = FN(splat)(1.5252733804059840e-5f);
  p = p * f + 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  return p * (VEC)((n + 127) << 23);
}

ALWAYS_INLINE float FN(hmax)(VEC x) {
  float m = x[0];
  for (int l = 1; l < LANES; ++l) m = x[l] > m ? x[l] : m;
  return m;
}

ALWAYS_INLINE float FN(hsum)(VEC x) {
  float s = 0.0f;
  for (int l = 0; l < LANES; ++l) s += x[l];
  return s;
}

/* s[r, 0:KB] = q[r] . kt for ``rows`` rows at once, register accumulators. */
ALWAYS_INLINE void FN(score_rows)(unit_buffers* b, int r0, int rows, int64_t d) {
  VEC acc[SCORE_ROWS][KEY_VECTORS];
  for (int i = 0; i < rows; ++i)
    for (int t = 0; t < KEY_VECTORS; ++t) acc[i][t] = FN(splat)(0.0f);
  for (int64_t c = 0; c < d; ++c) {
    const float* kc = b->kt + c * KB;
    for (int i = 0; i < rows; ++i) {
      VEC qi = FN(splat)(b->q[(r0 + i) * MAX_HEAD_DIM + c]);
      for (int t = 0; t < KEY_VECTORS; ++t) acc[i][t] += qi * FN(load)(kc + t * LANES);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int t = 0; t < KEY_VECTORS; ++t) FN(store)(b->s + (r0 + i) * KB + t * LANES, acc[i][t]);
}

/* acc[r] += p[r, 0:keys] . vb for ``rows`` rows of ``vectors`` vectors each, register accumulators. */
ALWAYS_INLINE void FN(context_rows)(unit_buffers* b, int r0, int rows, int vectors, int keys) {
  VEC acc[4][MAX_VECTORS];
  for (int i = 0; i < rows; ++i)
    for (int t = 0; t < vectors; ++t) acc[i][t] = FN(load)(b->acc + (r0 + i) * MAX_HEAD_DIM + t * LANES);
  for (int j = 0; j < keys; ++j) {
    const float* vj = b->vb + j * MAX_HEAD_DIM;
    for (int i = 0; i < rows; ++i) {
      VEC p = FN(splat)(b->s[(r0 + i) * KB + j]);
      for (int t = 0; t < vectors; ++t) acc[i][t] += p * FN(load)(vj + t * LANES);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int t = 0; t < vectors; ++t) FN(store)(b->acc + (r0 + i) * MAX_HEAD_DIM + t * LANES, acc[i][t]);
}

/* acc += p . vb for the unit's ``nq`` rows in tiles of up to 4 rows within CONTEXT_ACCUMULATORS vectors;
 * ``vectors`` is a constant in each instantiation (context_block), so the tile stays in registers. */
ALWAYS_INLINE void FN(context_all)(unit_buffers* b, int nq, int vectors, int keys) {
  int fit = CONTEXT_ACCUMULATORS / vectors;
  int tile = fit < 1 ? 1 : fit > 4 ? 4 : fit;
  int r = 0;
  for (; r + tile <= nq; r += tile) FN(context_rows)(b, r, tile, vectors, keys);
  for (; r < nq; ++r) FN(context_rows)(b, r, 1, vectors, keys);
}

ALWAYS_INLINE void FN(context_block)(unit_buffers* b, int nq, int vectors, int keys) {
  switch (vectors) {
    case 1: FN(context_all)(b, nq, 1, keys); break;
    case 2: FN(context_all)(b, nq, 2, keys); break;
    case 3: FN(context_all)(b, nq, 3, keys); break;
    case 4: FN(context_all)(b, nq, 4, keys); break;
    case 5: FN(context_all)(b, nq, 5, keys); break;
    case 6: FN(context_all)(b, nq, 6, keys); break;
    case 7: FN(context_all)(b, nq, 7, keys); break;
#if MAX_VECTORS > 8
    case 8: FN(context_all)(b, nq, 8, keys); break;
    case 9: FN(context_all)(b, nq, 9, keys); break;
    case 10: FN(context_all)(b, nq, 10, keys); break;
    case 11: FN(context_all)(b, nq, 11, keys); break;
    case 12: FN(context_all)(b, nq, 12, keys); break;
    case 13: FN(context_all)(b, nq, 13, keys); break;
    case 14: FN(context_all)(b, nq, 14, keys); break;
    case 15: FN(context_all)(b, nq, 15, keys); break;
#endif
    default: FN(context_all)(b, nq, MAX_VECTORS, keys); break;
  }
}

/* Online softmax of score row r over ``keys`` valid keys: p in place (0 past ``keys``), the accumulator
 * of the row rescaled by 2^(old max - new max). */
ALWAYS_INLINE void FN(softmax_row)(unit_buffers* b, int r, int keys, int vectors) {
  float* s = b->s + r * KB;
  for (int j = keys; j < KB; ++j) s[j] = MASKED_SCORE;
  VEC m = FN(load)(s);
  for (int t = 1; t < KEY_VECTORS; ++t) m = FN(vmax)(m, FN(load)(s + t * LANES));
  float top = FN(hmax)(m);
  float old = b->max[r];
  float next = top > old ? top : old;
  for (int t = 0; t < KEY_VECTORS; ++t) FN(store)(s + t * LANES, FN(exp2_neg)(FN(load)(s + t * LANES) - next));
  for (int j = keys; j < KB; ++j) s[j] = 0.0f;
  VEC total = FN(load)(s);
  for (int t = 1; t < KEY_VECTORS; ++t) total += FN(load)(s + t * LANES);
  float alpha = FN(exp2_neg)(FN(splat)(old - next))[0];
  b->sum[r] = b->sum[r] * alpha + FN(hsum)(total);
  b->max[r] = next;
  if (alpha != 1.0f)
    for (int t = 0; t < vectors; ++t) {
      float* a = b->acc + r * MAX_HEAD_DIM + t * LANES;
      FN(store)(a, FN(load)(a) * alpha);
    }
}

/* One unit: queries [q0, q1) of head h against the keys [s0, s1) of their segment. */
ALWAYS_INLINE void FN(run_unit)(unit_buffers* b, const attention_job* job, int64_t h, const int64_t* block) {
  int64_t q0 = block[0], s0 = block[2], s1 = block[3];
  int nq = (int)(block[1] - q0);
  int64_t d = job->head_dim, row = job->heads * d;
  int vectors = (int)((d + LANES - 1) / LANES);
  float qscale = job->scale * LOG2_E;
  for (int i = 0; i < nq; ++i) {
    b->max[i] = MASKED_SCORE;
    b->sum[i] = 0.0f;
    memset(b->acc + i * MAX_HEAD_DIM, 0, (size_t)vectors * LANES * sizeof(float));
    const float* qi = job->q + (q0 + i) * row + h * d;
    for (int64_t c = 0; c < d; ++c) b->q[i * MAX_HEAD_DIM + c] = qi[c] * qscale;
  }
  for (int64_t k0 = s0; k0 < s1; k0 += KB) {
    int keys = (int)(s1 - k0 < KB ? s1 - k0 : KB);
    load_key_block(b, job, h, k0, keys);
    int r = 0;
    for (; r + SCORE_ROWS <= nq; r += SCORE_ROWS) FN(score_rows)(b, r, SCORE_ROWS, d);
    for (; r < nq; ++r) FN(score_rows)(b, r, 1, d);
    for (r = 0; r < nq; ++r) FN(softmax_row)(b, r, keys, vectors);
    FN(context_block)(b, nq, vectors, keys);
  }
  for (int i = 0; i < nq; ++i) {
    float inv = 1.0f / b->sum[i];
    float* o = job->out + (q0 + i) * row + h * d;
    for (int64_t c = 0; c < d; ++c) o[c] = b->acc[i * MAX_HEAD_DIM + c] * inv;
  }
}

/* Take units until none are left. */
PATH_TARGET static int FN(worker)(attention_job* job) {
  unit_buffers* b = NULL;
  if (posix_memalign((void**)&b, 64, sizeof *b) != 0) return OUT_OF_MEMORY;
  memset(b, 0, sizeof *b); /* the padding lanes of v rows are read (and never written out) */
  int64_t units = job->num_blocks * job->heads;
  for (;;) {
    int64_t u = __atomic_fetch_add(&job->next_unit, 1, __ATOMIC_RELAXED);
    if (u >= units) break;
    FN(run_unit)(b, job, u % job->heads, job->blocks + 4 * (u / job->heads));
  }
  free(b);
  return OK;
}

#undef VEC
#undef IVEC
#undef KEY_VECTORS
#undef MAX_VECTORS

#endif /* MLCV_VECTOR_CODE */
