"""A C library calls a ctypes callback from its own thread; the callback forwards into tsfn.

    python examples/native_callbacks.py [--samples N] [--libc]

Many native libraries (audio, devices, drivers, databases) report through a callback
that they call from a thread of their own: not the event loop's thread, not even a
Python thread. Here that library is a tiny "sensor" written in C and built at run time
with the system compiler into a temporary directory. Its thread calls our callback
once per sample; the callback hands each sample to a ThreadsafeFunction, whose
callback then runs on the loop thread, in order, with backpressure on the C thread.

Without a C compiler (or with --libc), libc's own `pthread_create` starts the native
thread instead and a Python function plays the sensor's loop: the thread is still one
that Python did not create. POSIX only (Linux, macOS).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import tsfn

SENSOR_C = r"""
#include <pthread.h>
#include <stdlib.h>

/* The library's callback type: return 0 to go on, anything else to stop. */
typedef int (*sample_cb)(int index, double value);

struct sensor { pthread_t thread; sample_cb cb; int count; };

static void *run(void *arg) {
    struct sensor *s = arg;
    for (int i = 0; i < s->count; i++) {
        double value = 0.5 * i;                 /* a "measurement" */
        if (s->cb(i, value) != 0) break;        /* the callback asked us to stop */
    }
    s->cb(-1, 0.0);                             /* end of stream */
    return NULL;
}

/* Start a thread that calls `cb` `count` times, then once with index -1. */
struct sensor *sensor_start(sample_cb cb, int count) {
    struct sensor *s = malloc(sizeof *s);
    if (s == NULL) return NULL;
    s->cb = cb;
    s->count = count;
    if (pthread_create(&s->thread, NULL, run, s) != 0) { free(s); return NULL; }
    return s;
}

void sensor_join(struct sensor *s) { pthread_join(s->thread, NULL); free(s); }
"""

# The C callback type, as ctypes sees it. ctypes takes the GIL when a C thread calls
# a function of this type, so the Python body below may call anything, tsfn included.
SAMPLE_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_double)
# pthread_create's `void *(*start_routine)(void *)`, for the libc fallback.
START_ROUTINE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)

Sample = tuple[int, float]


def build_sensor(directory: str) -> ctypes.CDLL | None:
    """Compile SENSOR_C into a shared library in `directory`; None if that fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("no C compiler found (cc): using libc's pthread_create instead")
        return None
    source = Path(directory, "sensor.c")
    library = Path(directory, "libsensor.so")
    source.write_text(SENSOR_C)
    command = [compiler, "-shared", "-fPIC", "-O2", "-pthread", "-o", str(library), str(source)]
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode != 0:
        print(f"{compiler} failed ({built.stderr.strip()}): using libc's pthread_create instead")
        return None
    lib = ctypes.CDLL(str(library))
    lib.sensor_start.argtypes = [SAMPLE_CB, ctypes.c_int]
    lib.sensor_start.restype = ctypes.c_void_p
    lib.sensor_join.argtypes = [ctypes.c_void_p]
    lib.sensor_join.restype = None
    print(f"built {library.name} with {Path(compiler).name}")
    return lib


def start_with_libc(
    callback: Callable[[int, float], int], count: int
) -> tuple[object, Callable[[], None]]:
    """Run the sensor's loop on a thread made by libc's pthread_create.

    Returns the ctypes function the thread runs (keep it referenced until the thread
    has finished: ctypes frees its C trampoline with the object) and a join function.
    """
    libc = ctypes.CDLL(None)  # the symbols already loaded in this process, libc's included

    def sensor_loop(_arg: int | None) -> None:
        for i in range(count):
            if callback(i, 0.5 * i) != 0:
                break
        callback(-1, 0.0)

    run = START_ROUTINE(sensor_loop)
    thread = ctypes.c_ulong()  # a pthread_t: an unsigned long on Linux, a pointer on macOS
    if libc.pthread_create(ctypes.byref(thread), None, run, None) != 0:
        raise OSError("pthread_create failed")
    return run, functools.partial(libc.pthread_join, thread, None)


def join_all(joins: list[Callable[[], object]]) -> None:
    """The finalizer: join the native thread(s), on the loop thread."""
    for join in joins:
        join()


async def main(lib: ctypes.CDLL | None, count: int) -> list[Sample]:
    """Receive `count` samples from a native thread: `lib`'s, or libc's if it is None."""
    received: list[Sample] = []
    loop_threads: set[str] = set()

    def on_sample(sample: Sample) -> None:  # on the loop thread, once per sample, in order
        received.append(sample)
        loop_threads.add(threading.current_thread().name)

    native_threads: set[int] = set()  # the operating system's ids of the calling threads
    # One producer: the native thread, which releases after its last sample. As in
    # Node's own tests, the finalizer joins the thread (by then it has released, so
    # the join returns at once); the context holds the join once the thread is up.
    joins: list[Callable[[], object]] = []
    samples = tsfn.ThreadsafeFunction(
        on_sample, context=joins, finalizer=join_all, max_queue_size=64, name="samples"
    )

    def on_native_sample(index: int, value: float) -> int:
        # On the C library's thread, which Python did not start.
        native_threads.add(threading.get_native_id())
        if index < 0:
            samples.release()  # end of stream: the function closes once it has drained
            return 0
        try:
            samples.call((index, value))  # waits while 64 samples are queued
        except tsfn.Closing:
            return 1  # the loop side aborted (or is shutting down): stop the sensor
        return 0

    # `keep` holds the ctypes callback for as long as the native thread may call it.
    keep: object
    if lib is None:
        keep, join = start_with_libc(on_native_sample, count)
        joins.append(join)
    else:
        keep = callback = SAMPLE_CB(on_native_sample)
        handle = lib.sensor_start(callback, count)
        if handle is None:
            raise OSError("sensor_start failed")
        joins.append(functools.partial(lib.sensor_join, handle))
    await samples.wait_closed()  # every sample delivered, and the finalizer joined
    del keep

    in_order = [index for index, _ in received] == list(range(count))
    total = sum(value for _, value in received)
    print(f"{len(received)} samples, in order: {in_order}, sum of values: {total}")
    elsewhere = threading.get_native_id() not in native_threads
    print(f"called back on {len(native_threads)} native thread, not the loop's: {elsewhere}")
    print(f"delivered on {sorted(loop_threads)}, the loop's thread")
    return received


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Native callbacks into a ThreadsafeFunction.")
    parser.add_argument("--samples", type=int, default=10_000, help="samples to send")
    parser.add_argument("--libc", action="store_true", help="skip the compiler, use libc")
    args = parser.parse_args(argv)
    if os.name != "posix":
        sys.exit("this example needs a POSIX system (pthreads): Linux or macOS")
    # Build before the loop starts: compiling blocks, and nothing should block the loop.
    with tempfile.TemporaryDirectory() as directory:
        lib = None if args.libc else build_sensor(directory)
        asyncio.run(main(lib, args.samples))


if __name__ == "__main__":
    cli()
