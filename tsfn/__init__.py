"""tsfn: Node-API's threadsafe functions for asyncio.

Worker threads `call` a `ThreadsafeFunction`; its callback runs on the event loop's
thread, with backpressure, producer counting, abort and a finalizer. `AsyncWork` runs
a function on a worker and completes on the loop; `stream` turns a worker's results
into an async iterator; `run` is `asyncio.run` with Node's event-loop liveness.
Inside a worker, `cancelled()` and `cancel_token()` tell it that its result is no
longer wanted.
"""

from ._cancel import CancelHook, CancelToken, cancel_token, cancelled
from ._errors import Closing, QueueFull, TsfnError, WouldDeadlock
from ._function import ThreadsafeFunction
from ._run import run
from ._stream import Stream, stream
from ._work import AsyncWork, Status

__all__ = [
    "AsyncWork",
    "CancelHook",
    "CancelToken",
    "Closing",
    "QueueFull",
    "Status",
    "Stream",
    "ThreadsafeFunction",
    "TsfnError",
    "WouldDeadlock",
    "cancel_token",
    "cancelled",
    "run",
    "stream",
]

# Each public object says it is `tsfn.X`, not the private module that defines it: in
# reprs (`<class 'tsfn.Closing'>`), tracebacks (`tsfn.Closing: ...`), pickles and
# documentation tools. Every one of them is importable from here, so pickles made
# this way load anywhere. (trio does the same, for the same reason.)
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
