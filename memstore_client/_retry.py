"""When a failed call is tried again: the retry policy, and a stream's resumption."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from .errors import DeadlineExceeded, MemstoreError, Unavailable, from_rpc_error


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How UNAVAILABLE is retried: idempotent calls only, exponential backoff, full jitter.

    A unary call makes at most `max_attempts` attempts; before attempt n+1 it sleeps a random
    time up to min(max_backoff, initial_backoff * multiplier**(n-1)), all within its timeout
    (the defaults: 4 attempts, sleeps of at most 0.1, 0.2 and 0.4 s). A stream that has
    delivered a chunk keeps resuming, with the same backoff and each attempt waiting for the
    connection to come back, for up to `stream_budget` seconds from the first failure after
    its last chunk (a frozen server: stream_idle_timeout, then the budget).

    Raises:
        ValueError: a field out of range (named); checked when the policy is made.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    stream_budget: float = 30.0

    def __post_init__(self) -> None:
        # Checked here: a negative backoff failed later, inside sleep, mid-retry, and
        # max_attempts=0 made one attempt all the same.
        if type(self.max_attempts) is not int or self.max_attempts < 1:
            raise ValueError(
                f"max_attempts: must be an int of at least 1, not {self.max_attempts!r}"
            )
        for name, least in (
            ("initial_backoff", 0.0),
            ("max_backoff", 0.0),
            ("multiplier", 1.0),
            ("stream_budget", 0.0),
        ):
            value = getattr(self, name)
            if not _number(value) or not math.isfinite(value) or value < least:
                raise ValueError(
                    f"{name}: must be a finite number of at least {least:g}, not {value!r}"
                )

    def backoff(self, retry: int) -> float:
        """The sleep before retry `retry` (0 for the first): full jitter under the cap."""
        try:
            cap = min(self.max_backoff, self.initial_backoff * self.multiplier**retry)
        except OverflowError:
            cap = self.max_backoff
        return random.uniform(0, cap)

    def delays(self) -> Iterator[float]:
        """The sleeps before each retry (max_attempts - 1 of them)."""
        for retry in range(self.max_attempts - 1):
            yield self.backoff(retry)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def retry_delay(
    error: grpc.RpcError, delays: Iterator[float], deadline: float | None = None
) -> float | None:
    """The sleep before retrying a failed call, or None when it must not be retried: not
    UNAVAILABLE, no attempt left, or the sleep would end past the call's `deadline` (a
    time.monotonic() value)."""
    if code_of(error) != grpc.StatusCode.UNAVAILABLE:
        return None
    delay = next(delays, None)
    if delay is not None and deadline is not None and time.monotonic() + delay >= deadline:
        return None
    return delay


def time_left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (a time.monotonic() value), for the next attempt's timeout;
    None without one."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class Resumption:
    """When one chunked stream tries again, and for how long each attempt may wait.

    Before the stream's first chunk a failure is retried as a unary call's is (max_attempts);
    once a chunk came, a failure starts the policy's stream_budget, and every resumed attempt
    waits for the connection (wait_for_ready) until the budget runs out. A read waits at most
    `idle_timeout` (then its attempt is cancelled and resumed, as after UNAVAILABLE), and while
    resuming, at most what is left of the budget.
    """

    def __init__(self, policy: RetryPolicy, idle_timeout: float | None) -> None:
        self._policy = policy
        self._idle_timeout = idle_timeout
        self._delays = policy.delays()
        self._started = False
        self._until: float | None = None
        self._retries = 0
        #: The longest the last read was allowed to wait, for the message of a silent peer.
        self.waited: float | None = None

    def call_options(self) -> dict[str, bool]:
        """The next attempt's options: a resumed one waits for the reconnect (wait_for_ready)
        rather than fail on gRPC's cached reconnect backoff; a first one is sent as a unary
        call is (and as grpcio-testing's channel, which knows no wait_for_ready, takes it)."""
        return {"wait_for_ready": True} if self._until is not None else {}

    def read_timeout(self) -> float | None:
        """Seconds the next read may wait for a message (None: no bound)."""
        timeout = self._idle_timeout
        if self._until is not None:
            left = max(self._until - time.monotonic(), 0.0)
            timeout = left if timeout is None else min(timeout, left)
        self.waited = timeout
        return timeout

    def progressed(self) -> None:
        """A chunk arrived: the next failure starts a budget of its own."""
        self._started = True
        self._until = None
        self._retries = 0

    def delay(self, error: grpc.RpcError | None) -> float | None:
        """The sleep before the next attempt after `error` (None: the attempt's read waited
        past its timeout), or None when the stream must give up."""
        if error is not None and code_of(error) != grpc.StatusCode.UNAVAILABLE:
            return None
        if not self._started:
            return next(self._delays, None)
        now = time.monotonic()
        if self._until is None:
            self._until = now + self._policy.stream_budget
        delay = self._policy.backoff(self._retries)
        self._retries += 1
        return None if now + delay >= self._until else delay

    def failure(self, error: grpc.RpcError | None, page_token: str) -> MemstoreError:
        """What the stream raises when it gives up, with the token that resumes it.

        Reads that went unanswered while resuming (a server down, whose attempts wait for
        the reconnect, or one frozen) give Unavailable, as a server that cannot be reached
        does: a caller resuming on Unavailable got DeadlineExceeded instead (a review).
        Before any chunk came, they give DeadlineExceeded (STREAM_IDLE)."""
        if error is None and self._until is not None:
            failed: MemstoreError = Unavailable(
                f"the server answered nothing for the stream's whole stream_budget of "
                f"{self._policy.stream_budget:g} s",
                reason="STREAM_UNREACHABLE",
            )
        elif error is None:
            failed = DeadlineExceeded(
                f"the server sent nothing for {self.waited or 0:.3g} s (stream_idle_timeout "
                f"{self._idle_timeout} s)",
                reason="STREAM_IDLE",
            )
        else:
            failed = from_rpc_error(error)
        failed.page_token = page_token
        return failed


def code_of(error: BaseException) -> grpc.StatusCode | None:
    """The status code of a failed call (a sync call's RpcError is a grpc.Call; an
    AioRpcError is not, but has code() too)."""
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def checked_idle_timeout(value: float | None) -> float | None:
    """`stream_idle_timeout` when it is None or a positive number.

    Raises:
        ValueError: it is not.
    """
    if value is not None and (not _number(value) or not value > 0 or not math.isfinite(value)):
        raise ValueError(f"stream_idle_timeout: must be None or a positive number, not {value!r}")
    return value
