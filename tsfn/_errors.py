"""The exceptions tsfn raises; each names the Node-API status it stands for."""

from __future__ import annotations

import queue

__all__ = ["Closing", "QueueFull", "TsfnError", "WouldDeadlock"]


class TsfnError(Exception):
    """Base class of every exception tsfn raises on purpose."""


class Closing(TsfnError):
    """The function is closing or closed (Node: ``napi_closing``).

    Raised by `call`, `submit` and `acquire` once the last producer has released,
    after `abort`, or after the function's loop shut down; and by `release` when no
    producer is left to release. A call that raises it did not queue its item.
    """


class QueueFull(TsfnError, queue.Full):
    """A bounded queue had no room (Node: ``napi_queue_full``).

    Raised at once by a non-blocking call, or by a blocking call whose timeout
    expired. It is also a `queue.Full`, so code written for `queue.Queue` catches it.
    """


class WouldDeadlock(TsfnError):
    """A blocking call on the loop thread found the queue full.

    Only the loop thread drains the queue, so waiting there for room could never end.
    Node-API reserved ``napi_would_deadlock`` for this and then deadlocks instead;
    tsfn raises.
    """
