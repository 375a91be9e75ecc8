"""The shortest path through the library: one thread, one function, every item."""

from __future__ import annotations

import threading

import pytest

import tsfn

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]


async def test_items_from_a_thread_reach_the_callback_in_order() -> None:
    got: list[int] = []
    finalized: list[object] = []
    fn = tsfn.ThreadsafeFunction(got.append, context="ctx", finalizer=finalized.append)

    def producer() -> None:
        for i in range(1000):
            fn.call(i)
        fn.release()

    thread = threading.Thread(target=producer)
    thread.start()
    await fn.wait_closed()
    thread.join()
    assert got == list(range(1000))
    assert finalized == ["ctx"]
    assert fn.closed
