"""The cap on calls in flight (--max-calls-in-flight): past it, a call is refused as overload."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from server.errors import ResourceExhausted

#: The most --max-calls-in-flight accepts: gRPC's own backlog of calls not yet picked up
#: (server/serving/app.py), past which a cap would never be reached.
MAX_CALLS_IN_FLIGHT = 1_000_000
#: Seconds a gRPC answer may wait to be sent (--send-stall-timeout's default): the Python
#: client's (memstore_client) own stream_idle_timeout.
SEND_STALL_SECONDS = 60.0


class CallLimit:
    """At most `most` calls served at once by this process, gRPC and HTTP together.

    Each call in flight holds memory (about 11 KB, docs/reliability.md) until it is answered;
    a call past the cap is answered at once with the overload error, as a full pool queue
    (--pool-max-waiting) answers, so that no client can make the server hold calls without
    bound. gRPC's own `maximum_concurrent_rpcs` refuses with a bare RESOURCE_EXHAUSTED
    ("Concurrent RPC limit exceeded!": no ErrorInfo reason, no access line, no metric) and
    counts health checks too, so the cap is kept here, where the calls are wrapped.
    """

    def __init__(
        self,
        most: int,
        setting: str = "--max-calls-in-flight",
        send_stall: float = SEND_STALL_SECONDS,
    ) -> None:
        self.most = most
        #: Seconds a gRPC answer may wait to be sent before its call is cancelled (watch_send).
        self.send_stall = send_stall
        #: What set `most`, named in the refusal: the flag, or the variable that set it.
        self.setting = setting
        self.in_flight = 0

    def enter(self) -> None:
        """Counts a call in until `leave`.

        Raises:
            ResourceExhausted: `most` calls are in flight (reason SERVER_OVERLOADED).
        """
        if self.in_flight >= self.most:
            raise ResourceExhausted(
                f"server overloaded: {self.most} calls are in flight "
                f"({self.setting}); retry with backoff",
                reason="SERVER_OVERLOADED",
            )
        self.in_flight += 1

    def leave(self) -> None:
        """Counts a call out."""
        self.in_flight -= 1

    def enter_task(self) -> None:
        """Counts the current task's call in until the task ends (a gRPC call's handler).

        Raises:
            ResourceExhausted: `most` calls are in flight (reason SERVER_OVERLOADED).
        """
        self.enter()
        task = asyncio.current_task()
        if task is None:  # not in a task: nothing would count it out
            self.leave()
            return
        task.add_done_callback(self._left)

    def _left(self, _task: asyncio.Task[object]) -> None:
        self.leave()


def _nothing() -> None:
    pass


def watch_send(stall: float, *, till_done: bool = True) -> Callable[[], None]:
    """Cancels the current task (a gRPC call's handler) if it is still running `stall` seconds
    from now; returns what disarms that. Armed once an answer is ready to go: a client that
    never reads it (an HTTP/2 window of 0, a stream it does not read) would otherwise keep the
    call, its slot under the cap and the answer's memory for as long as its connection lives.
    Cancelling the task ends the call (the client sees CANCELLED or its stream reset).
    Disarmed when the task ends (`till_done`), or by the caller: a stream disarms each
    answer's watch when the client took it, with no callback left on the task per answer."""
    task = asyncio.current_task()
    if task is None or stall <= 0:
        return _nothing
    timer = asyncio.get_running_loop().call_later(stall, task.cancel)
    if till_done:
        task.add_done_callback(lambda _task: timer.cancel())
    return timer.cancel
