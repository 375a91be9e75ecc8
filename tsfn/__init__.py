"""tsfn: Node-API's threadsafe functions for asyncio.

Worker threads `call` a `ThreadsafeFunction`; its callback runs on the event loop's
thread. See https://github.com/ (docs/) for the guide; `ThreadsafeFunction`,
`AsyncWork`, `stream` and `run` are the whole public API.
"""

from ._errors import Closing, QueueFull, TsfnError, WouldDeadlock
from ._function import ThreadsafeFunction

__all__ = [
    "Closing",
    "QueueFull",
    "ThreadsafeFunction",
    "TsfnError",
    "WouldDeadlock",
]
