/*
 * TVM's thread pool for the C kernels (tvm/runtime/c_backend_api.h), declared here so that the
 * kernels compile without TVM's headers.
 *
 * A library TVM exports reaches the runtime through function pointers that the runtime fills in
 * when it loads the library (``__TVMBackendParallelLaunch``, defined by TVM's generated code in the
 * same library); the kernels launch their tasks through the same pointer, so they share the
 * library's threads. Both symbols are weak: a kernel object loaded alone (the ctypes tests) finds
 * neither and runs its tasks serially.
 */
#ifndef MLCV_TVM_THREAD_POOL_H_
#define MLCV_TVM_THREAD_POOL_H_

#include <stddef.h>
#include <stdint.h>

typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
typedef int (*parallel_launch_fn)(FTVMParallelLambda flambda, void* cdata, int num_task);
extern parallel_launch_fn __TVMBackendParallelLaunch __attribute__((weak));
extern int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void* cdata, int num_task) __attribute__((weak));

/* The library's launch function; NULL when TVM's runtime is not linked in (run the tasks serially). */
static inline parallel_launch_fn mlcv_thread_pool(void) {
  if (&__TVMBackendParallelLaunch != NULL && __TVMBackendParallelLaunch != NULL) return __TVMBackendParallelLaunch;
  return TVMBackendParallelLaunch;
}

#endif /* MLCV_TVM_THREAD_POOL_H_ */
