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
 * The tiles use GCC/Clang vector extensions (16 floats), compiled three times
 * (AVX-512, AVX2 + FMA, baseline) with per-function target attributes; the
 * path is picked from the CPU at run time, so the object runs on any x86-64
 * CPU (and on other CPUs with the baseline path). Compiled with the host C
 * compiler at export (cpu_segment_attention.py) and linked into the library.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#define MLCV_X86 1
#else
#define MLCV_X86 0
#endif

/* TVM's C backend API (see cpu_bf16_gemm.c): the library's pointer to the thread pool, weak so that the
 * object loaded alone (the ctypes test) runs serially. */
typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
typedef int (*parallel_launch_fn)(FTVMParallelLambda flambda, void* cdata, int num_task);
extern parallel_launch_fn __TVMBackendParallelLaunch __attribute__((weak));
extern int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void* cdata, int num_task) __attribute__((weak));

static parallel_launch_fn thread_pool(void) {
  if (&__TVMBackendParallelLaunch != NULL && __TVMBackendParallelLaunch != NULL) return __TVMBackendParallelLaunch;
  return TVMBackendParallelLaunch;
}

enum { PATH_GENERIC = 0, PATH_AVX2 = 1, PATH_AVX512 = 2 };
enum { OK = 0, OUT_OF_MEMORY = -1, SEGMENTS_NOT_SORTED = -2, BAD_HEAD_DIM = -3 };

#define QB 32          /* queries per unit */
#define KB 64          /* keys per block: 4 vectors of 16 */
#define LANES 16
#define MAX_HEAD_DIM 128
#define MAX_VECTORS (MAX_HEAD_DIM / LANES)
#define LOG2_E 1.44269504088896341f
#define EXP2_MIN -126.0f /* 2^x below this is treated as 2^-126 (a masked key or an empty start) */

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64), aligned(4)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* 64-byte vectors only live inside the workers below (everything is inlined), so no call passes one. */
#pragma GCC diagnostic ignored "-Wpsabi"

ALWAYS_INLINE v16 splat(float x) { return (v16){0} + x; }
ALWAYS_INLINE v16 load(const float* p) { return *(const v16*)p; }
ALWAYS_INLINE void store(float* p, v16 x) { *(v16*)p = x; }
ALWAYS_INLINE v16 vmax(v16 a, v16 b) {
  i16 take_a = (i16)(a > b); /* all ones where a > b */
  return (v16)(((i16)a & take_a) | ((i16)b & ~take_a));
}

/* 2^x for x <= 0, relative error about 1e-7: x = n + f with n = round(x), f in [-1/2, 1/2], 2^f by the
 * degree-7 Taylor polynomial of e^(f ln 2), 2^n from the exponent bits. Below EXP2_MIN it is 2^-126. */
ALWAYS_INLINE v16 exp2_neg(v16 x) {
  x = vmax(x, splat(EXP2_MIN));
  v16 up = x + 0.5f;
  i16 n = __builtin_convertvector(up, i16); /* truncates toward zero: n >= up for up <= 0 */
  n = n + (i16)(__builtin_convertvector(n, v16) > up); /* the comparison is -1 where true: floor(up) */
  v16 f = x - __builtin_convertvector(n, v16);
  v16 p = splat(1.5252733804059840e-5f);
  p = p * f + 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  return p * (v16)((n + 127) << 23);
}

ALWAYS_INLINE float hmax(v16 x) {
  float m = x[0];
  for (int l = 1; l < LANES; ++l) m = x[l] > m ? x[l] : m;
  return m;
}

ALWAYS_INLINE float hsum(v16 x) {
  float s = 0.0f;
  for (int l = 0; l < LANES; ++l) s += x[l];
  return s;
}

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

/* s[r, 0:KB] = q[r] . kt for ``rows`` rows at once (4 vectors of keys each), register accumulators. */
ALWAYS_INLINE void score_rows(unit_buffers* b, int r0, int rows, int64_t d) {
  v16 acc[4][4];
  for (int i = 0; i < rows; ++i)
    for (int t = 0; t < 4; ++t) acc[i][t] = splat(0.0f);
  for (int64_t c = 0; c < d; ++c) {
    const float* kc = b->kt + c * KB;
    v16 k0 = load(kc), k1 = load(kc + 16), k2 = load(kc + 32), k3 = load(kc + 48);
    for (int i = 0; i < rows; ++i) {
      v16 qi = splat(b->q[(r0 + i) * MAX_HEAD_DIM + c]);
      acc[i][0] += qi * k0;
      acc[i][1] += qi * k1;
      acc[i][2] += qi * k2;
      acc[i][3] += qi * k3;
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int t = 0; t < 4; ++t) store(b->s + (r0 + i) * KB + t * LANES, acc[i][t]);
}

/* acc[r] += p[r, 0:keys] . vb for ``rows`` rows of ``vectors`` vectors each, register accumulators. */
ALWAYS_INLINE void context_rows(unit_buffers* b, int r0, int rows, int vectors, int keys) {
  v16 acc[4][MAX_VECTORS];
  for (int i = 0; i < rows; ++i)
    for (int t = 0; t < vectors; ++t) acc[i][t] = load(b->acc + (r0 + i) * MAX_HEAD_DIM + t * LANES);
  for (int j = 0; j < keys; ++j) {
    const float* vj = b->vb + j * MAX_HEAD_DIM;
    for (int i = 0; i < rows; ++i) {
      v16 p = splat(b->s[(r0 + i) * KB + j]);
      for (int t = 0; t < vectors; ++t) acc[i][t] += p * load(vj + t * LANES);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int t = 0; t < vectors; ++t) store(b->acc + (r0 + i) * MAX_HEAD_DIM + t * LANES, acc[i][t]);
}

/* Online softmax of score row r over ``keys`` valid keys: p in place (0 past ``keys``), the accumulator
 * of the row rescaled by 2^(old max - new max). */
ALWAYS_INLINE void softmax_row(unit_buffers* b, int r, int keys, int vectors) {
  float* s = b->s + r * KB;
  for (int j = keys; j < KB; ++j) s[j] = -1.0e30f;
  v16 m = vmax(vmax(load(s), load(s + 16)), vmax(load(s + 32), load(s + 48)));
  float top = hmax(m);
  float old = b->max[r];
  float next = top > old ? top : old;
  for (int t = 0; t < 4; ++t) store(s + t * LANES, exp2_neg(load(s + t * LANES) - next));
  for (int j = keys; j < KB; ++j) s[j] = 0.0f;
  v16 total = load(s) + load(s + 16) + load(s + 32) + load(s + 48);
  float alpha = exp2_neg(splat(old - next))[0];
  b->sum[r] = b->sum[r] * alpha + hsum(total);
  b->max[r] = next;
  if (alpha != 1.0f)
    for (int t = 0; t < vectors; ++t) {
      float* a = b->acc + r * MAX_HEAD_DIM + t * LANES;
      store(a, load(a) * alpha);
    }
}

/* acc += p . vb for the unit's ``nq`` rows: register tiles of up to 4 rows (AVX-512) x ``vectors``
 * vectors; ``vectors`` is a constant in each instantiation (see context_block), so the tile is registers. */
ALWAYS_INLINE void context_all(unit_buffers* b, int nq, int vectors, int keys, int wide) {
  int tile = wide ? (24 / vectors < 4 ? 24 / vectors : 4) : 1;
  int r = 0;
  for (; r + tile <= nq; r += tile) context_rows(b, r, tile, vectors, keys);
  for (; r < nq; ++r) context_rows(b, r, 1, vectors, keys);
}

ALWAYS_INLINE void context_block(unit_buffers* b, int nq, int vectors, int keys, int wide) {
  switch (vectors) {
    case 1: context_all(b, nq, 1, keys, wide); break;
    case 2: context_all(b, nq, 2, keys, wide); break;
    case 3: context_all(b, nq, 3, keys, wide); break;
    case 4: context_all(b, nq, 4, keys, wide); break;
    case 5: context_all(b, nq, 5, keys, wide); break;
    case 6: context_all(b, nq, 6, keys, wide); break;
    case 7: context_all(b, nq, 7, keys, wide); break;
    default: context_all(b, nq, 8, keys, wide); break;
  }
}

/* Copy the key block [k0, k0 + keys) of head h: k transposed into kt, v rows into vb (zero padded). */
ALWAYS_INLINE void load_key_block(unit_buffers* b, const attention_job* job, int64_t h, int64_t k0, int keys) {
  int64_t d = job->head_dim, row = job->heads * d;
  for (int j = 0; j < KB; ++j) {
    const float* kj = job->k + (k0 + (j < keys ? j : 0)) * row + h * d;
    for (int64_t c = 0; c < d; ++c) b->kt[c * KB + j] = j < keys ? kj[c] : 0.0f;
  }
  for (int j = 0; j < keys; ++j) memcpy(b->vb + j * MAX_HEAD_DIM, job->v + (k0 + j) * row + h * d, d * sizeof(float));
}

/* One unit: queries [q0, q1) of head h against the keys [s0, s1) of their segment. */
ALWAYS_INLINE void run_unit(unit_buffers* b, const attention_job* job, int64_t h, const int64_t* block, int wide) {
  int64_t q0 = block[0], s0 = block[2], s1 = block[3];
  int nq = (int)(block[1] - q0);
  int64_t d = job->head_dim, row = job->heads * d;
  int vectors = (int)((d + LANES - 1) / LANES);
  int score_tile = wide ? 4 : 1;
  float qscale = job->scale * LOG2_E;
  for (int i = 0; i < nq; ++i) {
    b->max[i] = -1.0e30f;
    b->sum[i] = 0.0f;
    memset(b->acc + i * MAX_HEAD_DIM, 0, (size_t)vectors * LANES * sizeof(float));
    const float* qi = job->q + (q0 + i) * row + h * d;
    for (int64_t c = 0; c < d; ++c) b->q[i * MAX_HEAD_DIM + c] = qi[c] * qscale;
  }
  for (int64_t k0 = s0; k0 < s1; k0 += KB) {
    int keys = (int)(s1 - k0 < KB ? s1 - k0 : KB);
    load_key_block(b, job, h, k0, keys);
    int r = 0;
    for (; r + score_tile <= nq; r += score_tile) score_rows(b, r, score_tile, d);
    for (; r < nq; ++r) score_rows(b, r, 1, d);
    for (r = 0; r < nq; ++r) softmax_row(b, r, keys, vectors);
    context_block(b, nq, vectors, keys, wide);
  }
  for (int i = 0; i < nq; ++i) {
    float inv = 1.0f / b->sum[i];
    float* o = job->out + (q0 + i) * row + h * d;
    for (int64_t c = 0; c < d; ++c) o[c] = b->acc[i * MAX_HEAD_DIM + c] * inv;
  }
}

/* Take units until none are left; one body per instruction set (the vector code is inlined into each). */
#define DEFINE_WORKER(NAME, ATTR, WIDE)                                                         \
  ATTR static int NAME(attention_job* job) {                                                      \
    unit_buffers* b = NULL;                                                                       \
    if (posix_memalign((void**)&b, 64, sizeof *b) != 0) return OUT_OF_MEMORY;                     \
    memset(b, 0, sizeof *b); /* the padding lanes of v rows are read (and never written out) */   \
    int64_t units = job->num_blocks * job->heads;                                                 \
    for (;;) {                                                                                    \
      int64_t u = __atomic_fetch_add(&job->next_unit, 1, __ATOMIC_RELAXED);                      \
      if (u >= units) break;                                                                      \
      run_unit(b, job, u % job->heads, job->blocks + 4 * (u / job->heads), WIDE);                 \
    }                                                                                             \
    free(b);                                                                                      \
    return OK;                                                                                    \
  }

DEFINE_WORKER(worker_generic, , 0)
#if MLCV_X86
DEFINE_WORKER(worker_avx2, __attribute__((target("avx2,fma"))), 0)
DEFINE_WORKER(worker_avx512, __attribute__((target("avx512f,avx512dq,fma"))), 1)
#endif

static int path_supported(int path) {
#if MLCV_X86
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

/* The attention with an explicit path (tests run every supported one). Returns 0 or a negative code. */
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
  parallel_launch_fn launch = thread_pool();
  int status = launch != NULL ? launch(parallel_task, &job, 0) : run_worker(&job);
  free(blocks);
  return status == 0 ? OK : OUT_OF_MEMORY;
}

/* The entry the library calls (compiler/passes/segment_attention.py), on the fastest path here. */
int mlcv_segment_attention(const float* q, const float* k, const float* v, const int32_t* seg, float* out, int64_t n,
                           int64_t heads, int64_t head_dim, float scale) {
  return mlcv_segment_attention_path(mlcv_segment_attention_best_path(), q, k, v, seg, out, n, heads, head_dim, scale);
}
