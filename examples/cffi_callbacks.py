"""A C library calls back through cffi from its own pthread; tsfn takes it to the loop.

    python examples/cffi_callbacks.py [--samples N]

The C "sensor" below starts a pthread that calls a Python function (cffi's
`extern "Python"`) once per sample, then, like a device that stays open, idles until
`sensor_stop()` is called. cffi compiles it at run time with the system C compiler
into a temporary directory (API mode, the way cffi recommends).

The samples go into a `tsfn.stream`; the loop reads them with `async for`. The
stream's worker sits in `sensor_join()`, in C, with the GIL released: it cannot poll
anything. A cancellation hook calls `sensor_stop()` when the consumer leaves, and
the join returns. POSIX only (Linux, macOS); needs a C compiler and Python's headers.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import cffi

import tsfn

# What Python sees of the library (cffi's cdef). `extern "Python"` declares a function
# that C calls and Python implements; cffi takes the GIL for each call from C.
DECLARATIONS = """
struct sensor;
struct sensor *sensor_start(int count, void *userdata);
void sensor_stop(struct sensor *s);
void sensor_join(struct sensor *s);
void sensor_free(struct sensor *s);
extern "Python" int on_sample(void *userdata, int index, double value);
"""

SENSOR_C = r"""
#include <pthread.h>
#include <stdlib.h>

static int on_sample(void *userdata, int index, double value);  /* Python's */

struct sensor {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int stopped;
    int count;
    void *userdata;
};

static int is_stopped(struct sensor *s) {
    pthread_mutex_lock(&s->lock);
    int stopped = s->stopped;
    pthread_mutex_unlock(&s->lock);
    return stopped;
}

static void *run(void *arg) {
    struct sensor *s = arg;
    for (int i = 0; i < s->count && !is_stopped(s); i++) {
        if (on_sample(s->userdata, i, 0.5 * i) != 0) break;  /* nonzero: stop sending */
    }
    /* Stay open, as a device does, until someone calls sensor_stop(). */
    pthread_mutex_lock(&s->lock);
    while (!s->stopped) pthread_cond_wait(&s->wake, &s->lock);
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/* Start a thread that calls on_sample(userdata, i, value) `count` times. */
struct sensor *sensor_start(int count, void *userdata) {
    struct sensor *s = calloc(1, sizeof *s);
    if (s == NULL) return NULL;
    s->count = count;
    s->userdata = userdata;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->wake, NULL);
    if (pthread_create(&s->thread, NULL, run, s) != 0) { free(s); return NULL; }
    return s;
}

/* Any thread: tell the sensor's thread to end. */
void sensor_stop(struct sensor *s) {
    pthread_mutex_lock(&s->lock);
    s->stopped = 1;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
}

void sensor_join(struct sensor *s) { pthread_join(s->thread, NULL); }

void sensor_free(struct sensor *s) {
    pthread_cond_destroy(&s->wake);
    pthread_mutex_destroy(&s->lock);
    free(s);
}
"""

Sample = tuple[int, float]


def build_sensor(directory: str) -> ModuleType:
    """Compile the sensor with cffi into `directory`; return the extension module."""
    ffi = cffi.FFI()
    ffi.cdef(DECLARATIONS)
    ffi.set_source("_sensor_cffi", SENSOR_C, extra_compile_args=["-pthread"])
    library = ffi.compile(tmpdir=directory, verbose=False)
    spec = importlib.util.spec_from_file_location("_sensor_cffi", library)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(f"built {Path(library).name} with cffi")
    return module


def attach_callback(sensor: ModuleType) -> None:
    """Implement the library's `on_sample`: C calls it on the sensor's thread."""

    ffi = sensor.ffi  # the compiled module's FFI (types-cffi mistypes def_extern)

    @ffi.def_extern()  # type: ignore[untyped-decorator]
    def on_sample(userdata: Any, index: int, value: float) -> int:
        emit: Callable[[Sample], None] = ffi.from_handle(userdata)
        try:
            emit((index, value))  # blocks the C thread while 64 samples wait
        except tsfn.Closing:
            return 1  # the consumer has gone: the C loop stops sending
        return 0


def read_sensor(emit: Callable[[Sample], None], sensor: ModuleType, count: int) -> None:
    """The stream's worker: start the C sensor, wait in C until it is stopped."""
    ffi, lib = sensor.ffi, sensor.lib
    userdata = ffi.new_handle(emit)  # keep it referenced while C may use it
    handle = lib.sensor_start(count, userdata)
    if handle == ffi.NULL:
        raise OSError("sensor_start failed")
    try:
        # sensor_join() waits in C (cffi releases the GIL) until sensor_stop(): the
        # hook calls it when the consumer leaves, from tsfn's hooks thread. The
        # `with` also waits for a running hook before the sensor is freed.
        with tsfn.cancel_token().on_cancel(functools.partial(lib.sensor_stop, handle)):
            lib.sensor_join(handle)
    finally:
        lib.sensor_free(handle)
    print("the consumer left: the hook called sensor_stop() and the C thread ended")


async def main(sensor: ModuleType, count: int) -> list[Sample]:
    """Receive `count` samples from the C library's thread."""
    received: list[Sample] = []
    async with tsfn.stream(read_sensor, sensor, count) as samples:
        async for sample in samples:  # on the loop thread, in order
            received.append(sample)
            if len(received) == count:
                break  # the sensor never ends by itself: leaving cancels the worker
    in_order = [index for index, _ in received] == list(range(count))
    total = sum(value for _, value in received)
    print(f"{len(received)} samples, in order: {in_order}, sum of values: {total}")
    return received


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Callbacks from a C thread through cffi.")
    parser.add_argument("--samples", type=int, default=10_000, help="samples to send")
    args = parser.parse_args(argv)
    if os.name != "posix":
        sys.exit("this example needs a POSIX system (pthreads): Linux or macOS")
    # Build before the loop starts: compiling blocks, and nothing should block the loop.
    with tempfile.TemporaryDirectory() as directory:
        sensor = build_sensor(directory)
        attach_callback(sensor)
        asyncio.run(main(sensor, args.samples))


if __name__ == "__main__":
    cli()
