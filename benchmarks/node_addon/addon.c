/* The reference row of tsfn's benchmarks: Node's own napi_threadsafe_function.
 *
 * run(n, threads, maxQueueSize, callback) starts `threads` C threads; thread k
 * calls the threadsafe function with k, k + threads, k + 2*threads, ... < n (blocking
 * mode, which only matters when maxQueueSize > 0), then releases it. Every item
 * reaches `callback(i)` on the JS thread, exactly like the Python benchmark's
 * producers and sink. The returned promise resolves once the function is finalized
 * (all threads released, every item delivered, threads joined).
 *
 * Built by benchmarks/_node.py with the system C compiler against the npm package
 * node-api-headers; the napi_* symbols resolve from the node binary at load time.
 */
#define NAPI_VERSION 8
#include <node_api.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
  napi_threadsafe_function tsfn;
  napi_deferred deferred;
  pthread_barrier_t start;
  pthread_t *threads;
  int64_t n;
  int nthreads;
} Run;

typedef struct {
  Run *run;
  int64_t first;
} Producer;

static void *produce(void *arg) {
  Producer *p = arg;
  Run *run = p->run;
  /* Every producer starts at once, as the Python producers do on a Barrier. */
  pthread_barrier_wait(&run->start);
  for (int64_t i = p->first; i < run->n; i += run->nthreads) {
    napi_call_threadsafe_function(run->tsfn, (void *)(intptr_t)i, napi_tsfn_blocking);
  }
  napi_release_threadsafe_function(run->tsfn, napi_tsfn_release);
  free(p);
  return NULL;
}

static void call_js(napi_env env, napi_value callback, void *context, void *data) {
  (void)context;
  if (env == NULL) return; /* aborted: nothing to free, items are plain integers */
  napi_value undefined, item;
  napi_get_undefined(env, &undefined);
  napi_create_int64(env, (int64_t)(intptr_t)data, &item);
  napi_call_function(env, undefined, callback, 1, &item, NULL);
}

static void finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  Run *run = data;
  for (int k = 0; k < run->nthreads; k++) pthread_join(run->threads[k], NULL);
  pthread_barrier_destroy(&run->start);
  napi_value undefined;
  napi_get_undefined(env, &undefined);
  napi_resolve_deferred(env, run->deferred, undefined);
  free(run->threads);
  free(run);
}

static napi_value run(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4], name, promise;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 4) {
    napi_throw_type_error(env, NULL, "run(n, threads, maxQueueSize, callback)");
    return NULL;
  }
  int64_t n, nthreads, max_queue;
  napi_get_value_int64(env, argv[0], &n);
  napi_get_value_int64(env, argv[1], &nthreads);
  napi_get_value_int64(env, argv[2], &max_queue);
  if (n < 0 || nthreads < 1 || max_queue < 0) {
    napi_throw_range_error(env, NULL, "need n >= 0, threads >= 1, maxQueueSize >= 0");
    return NULL;
  }
  Run *r = calloc(1, sizeof(Run));
  r->n = n;
  r->nthreads = (int)nthreads;
  r->threads = calloc((size_t)nthreads, sizeof(pthread_t));
  pthread_barrier_init(&r->start, NULL, (unsigned)nthreads + 1);
  napi_create_promise(env, &r->deferred, &promise);
  napi_create_string_utf8(env, "tsfn-bench", NAPI_AUTO_LENGTH, &name);
  napi_create_threadsafe_function(env, argv[3], NULL, name, (size_t)max_queue,
                                  (size_t)nthreads, r, finalize, NULL, call_js, &r->tsfn);
  for (int k = 0; k < r->nthreads; k++) {
    Producer *p = malloc(sizeof(Producer));
    p->run = r;
    p->first = k;
    pthread_create(&r->threads[k], NULL, produce, p);
  }
  pthread_barrier_wait(&r->start);
  return promise;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "run", NAPI_AUTO_LENGTH, run, NULL, &fn);
  napi_set_named_property(env, exports, "run", fn);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
