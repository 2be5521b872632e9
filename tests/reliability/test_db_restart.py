"""PostgreSQL stopped and started under load: fail fast, heal alone, lose and repeat nothing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memstore.v1 import session_service_pb2 as spb
from memstore.v1 import user_service_pb2 as upb
from server.config import Config
from server.serving.app import build_server
from server.serving.embedded import EmbeddedPostgres
from server.serving.grpc_health import PING_ANSWER_SECONDS, watch_database
from server.serving.log_format import request_id
from server.store import Store
from tests.grpc import Sessions, Users, msg, struct
from tests.reliability import record

#: Each call's deadline: a call that is still waiting when it passes has hung. Five times
#: the pool's timeout (fix_faults.fault_store: 3 s), the longest a call may wait for a
#: connection, so that no load makes a call that waited that long look hung.
DEADLINE = 15.0
#: What a call refused because the database is known down says (server/store/base.py): it
#: never tried the database.
REFUSED_AT_ONCE = "retry later"
SERVICES = ("memstore.v1.UserService", "memstore.v1.SessionService")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Writer:
    """What one writer sent: acknowledged numbers, failed (maybe committed) ones, failures."""

    name: str
    acked: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    codes: list[grpc.StatusCode] = field(default_factory=list)
    failure_seconds: list[float] = field(default_factory=list)
    failure_details: list[str] = field(default_factory=list)
    ok_times: list[float] = field(default_factory=list)
    ok_seconds: list[float] = field(default_factory=list)


async def _run(writer: Writer, call: object, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        start = time.monotonic()
        try:
            await call(n)  # type: ignore[operator]
            writer.acked.append(n)
            writer.ok_times.append(time.monotonic())
            writer.ok_seconds.append(writer.ok_times[-1] - start)
        except grpc.aio.AioRpcError as error:
            # Never retried with the same number: a failure during the commit may have
            # committed, and a retry would write it twice.
            writer.failed.append(n)
            writer.codes.append(error.code())
            writer.failure_details.append(error.details() or "")
            writer.failure_seconds.append(time.monotonic() - start)
            await asyncio.sleep(0.02)
        n += 1


async def _services_are(channel: grpc.aio.Channel, status: int) -> bool:
    health = health_pb2_grpc.HealthStub(channel)
    statuses = {}
    for name in ("", *SERVICES):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=DEADLINE)
        statuses[name] = reply.status
    # Liveness ("") stays SERVING: the process is fine, and heals by itself.
    assert statuses[""] == SERVING
    return all(statuses[s] == status for s in SERVICES)


async def _wait_for(predicate: object, limit: float) -> float:
    start = time.monotonic()
    while not await predicate():  # type: ignore[operator]
        assert time.monotonic() - start < limit, f"not within {limit}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _calls(channel: grpc.aio.Channel, w: Writer) -> Any:
    """Write number n: an AddMemory of one message (sessions s*), or a metadata merge (u*)."""
    users, sessions = Users(channel), Sessions(channel)
    if w.name.startswith("s"):
        return lambda n: sessions.AddMemory(
            spb.AddMemoryRequest(session_id=w.name, messages=[msg(f"{w.name}:{n}")]),
            timeout=DEADLINE,
        )
    return lambda n: users.UpdateUser(
        upb.UpdateUserRequest(user_id=w.name, metadata=struct({"n": n})), timeout=DEADLINE
    )


async def _outage(
    pg: EmbeddedPostgres, channel: grpc.aio.Channel, writers: list[Writer]
) -> tuple[float, float]:
    """Stops PostgreSQL for two seconds under load; returns (outage, seconds to recover)."""
    down_at = time.monotonic()
    await asyncio.to_thread(pg.stop_server)
    try:
        await _wait_for(lambda: _services_are(channel, NOT_SERVING), limit=30)
        await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - down_at)))
    finally:
        # Started again even when the test fails, for the tests after it.
        await asyncio.to_thread(pg.start_server)
    back_at = time.monotonic()

    async def everyone_succeeded() -> bool:
        return all(w.ok_times and w.ok_times[-1] > back_at for w in writers)

    await _wait_for(everyone_succeeded, limit=60)
    recovered = max(min(t for t in w.ok_times if t > back_at) - back_at for w in writers)
    await _wait_for(lambda: _services_are(channel, SERVING), limit=30)
    return back_at - down_at, recovered


async def test_restart_mid_load_loses_and_repeats_nothing(
    restartable: EmbeddedPostgres, fault_url: str, fault_channel: grpc.aio.Channel
) -> None:
    users = Users(fault_channel)
    for i in range(2):
        await users.CreateUser(upb.CreateUserRequest(user_id=f"u{i}"), timeout=DEADLINE)
    adders = [Writer(f"s{i}") for i in range(3)]
    updaters = [Writer(f"u{i}") for i in range(2)]
    writers = adders + updaters
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_run(w, _calls(fault_channel, w), stop)) for w in writers]
    try:
        await asyncio.sleep(1.0)
        outage, recovered = await _outage(restartable, fault_channel, writers)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    failures = _check_failures(writers)
    found = await _check_messages(fault_url, adders)
    await _check_users(users, updaters)
    acked = sum(len(w.acked) for w in adders)
    record(
        "db_restart",
        outage_seconds=round(outage, 2),
        writes_acknowledged=acked + sum(len(w.acked) for w in updaters),
        messages_acknowledged=acked,
        messages_found=found,
        calls_failed=len(failures),
        median_failure_seconds=round(failures[len(failures) // 2], 3),
        median_refusal_seconds=round(_median(_refused(writers)), 4),
        median_acknowledged_seconds=round(_median(s for w in writers for s in w.ok_seconds), 3),
        slowest_failure_seconds=round(failures[-1], 3),
        # A call queued for a connection as the database went away fails with the first call
        # that finds it gone (tests/reliability/test_pool_wait.py), so none waits for it
        # to return.
        slowest_acknowledged_seconds=round(max(s for w in writers for s in w.ok_seconds), 3),
        seconds_to_recover=round(recovered, 3),
    )


def _check_failures(writers: list[Writer]) -> list[float]:
    """While PostgreSQL is down calls fail with UNAVAILABLE, fast; returns their durations.

    No bound on the wall clock: what makes a failure fast is that it does not try the
    database, which the store says, and the test times it against the same run's calls.
    """
    codes = {c for w in writers for c in w.codes}
    # Never INTERNAL, never a wait until the deadline (which would be DEADLINE_EXCEEDED).
    assert codes == {grpc.StatusCode.UNAVAILABLE}, codes
    # The call of each writer that was in flight or queued for a connection when the
    # database went away finds it gone (at once, after a second's wait for a fresh
    # connection, or when another call finds it gone); once the store has marked it down,
    # every call is refused without trying it, until the probe sees it back.
    for w in writers:
        tried = [d for d in w.failure_details if REFUSED_AT_ONCE not in d]
        assert len(tried) <= 1, (w.name, w.failure_details)
    refused = _refused(writers)
    assert refused, "no call was refused at once: the database was never marked down"
    # ... and such a refusal costs less than a call that reaches the database: the median
    # of each, measured in this run, on a machine as busy for both.
    median_ok = _median(s for w in writers for s in w.ok_seconds)
    assert _median(refused) < median_ok, (refused, median_ok)
    return sorted(s for w in writers for s in w.failure_seconds)


def _refused(writers: list[Writer]) -> list[float]:
    """The durations of the calls refused at once."""
    return [
        s
        for w in writers
        for s, d in zip(w.failure_seconds, w.failure_details, strict=True)
        if REFUSED_AT_ONCE in d
    ]


def _median(seconds: Iterable[float]) -> float:
    ordered = sorted(seconds)
    return ordered[len(ordered) // 2]


async def _check_messages(url: str, adders: list[Writer]) -> int:
    """Every acknowledged message is stored exactly once, in order; returns how many are."""
    found = 0
    async with await psycopg.AsyncConnection.connect(url) as conn:
        for w in adders:
            cur = await conn.execute(
                "SELECT content FROM messages WHERE session_id = %s ORDER BY sequence", [w.name]
            )
            numbers = [int(str(row[0]).split(":")[1]) for row in await cur.fetchall()]
            found += len(numbers)
            assert numbers == sorted(set(numbers)), f"{w.name}: repeated or out of order"
            assert set(w.acked) <= set(numbers), f"{w.name}: lost {set(w.acked) - set(numbers)}"
            # Anything more is a call that failed while its commit was under way.
            assert set(numbers) - set(w.acked) <= set(w.failed)
    return found


async def _check_users(users: Users, updaters: list[Writer]) -> None:
    for w in updaters:
        got = await users.GetUser(upb.GetUserRequest(user_id=w.name), timeout=DEADLINE)
        n = int(got.user.metadata["n"])
        assert n >= max(w.acked), f"{w.name}: acknowledged update {max(w.acked)} lost"
        assert n in w.acked or n in w.failed


async def test_an_outage_without_calls_shows_in_health(
    restartable: EmbeddedPostgres, fault_store: Store, fault_channel: grpc.aio.Channel
) -> None:
    # `memstore serve` pings the database, so a health checker learns of an outage even
    # when no call is made, and of the return.
    watcher = asyncio.create_task(watch_database(fault_store, interval=0.2))
    try:
        assert await _services_are(fault_channel, SERVING)
        await asyncio.to_thread(restartable.stop_server)
        try:
            noticed = await _wait_for(lambda: _services_are(fault_channel, NOT_SERVING), 30)
        finally:
            await asyncio.to_thread(restartable.start_server)
        healed = await _wait_for(lambda: _services_are(fault_channel, SERVING), limit=30)
    finally:
        watcher.cancel()
    record(
        "idle_outage_health", seconds_to_notice=round(noticed, 2), seconds_to_heal=round(healed, 2)
    )


async def test_a_database_that_stops_answering_shows_in_health(
    restartable: EmbeddedPostgres, fault_store: Store, fault_channel: grpc.aio.Channel
) -> None:
    # A server that stops answering without closing its connections (a hung primary, a
    # partition; here every PostgreSQL process stopped by SIGSTOP): the ping waited for
    # good, health said SERVING, and every call timed out. Calls then fail at once, and
    # the return is found.
    watcher = asyncio.create_task(watch_database(fault_store, interval=0.2, answer_within=1.0))
    try:
        noticed, healed = await _silence_shows_in_health(restartable, fault_channel)
    finally:
        watcher.cancel()
    record(
        "silent_database_health",
        seconds_to_notice=round(noticed, 2),
        seconds_to_heal=round(healed, 2),
    )


async def test_a_silent_database_shows_in_health_under_a_short_statement_timeout(
    restartable: EmbeddedPostgres, fault_url: str, fault_store: Store
) -> None:
    # The same with a statement timeout (1 s) whose bound on an answer (3 s, with the
    # margin) is shorter than the ping's own (PING_ANSWER_SECONDS, 5 s), as `memstore serve
    # --statement-timeout 1` runs: that bound cut the ping first, as a DEADLINE_EXCEEDED
    # that marked nothing down, and health said SERVING for as long as the database was
    # silent (found with a Citus worker served through, tests/citus/test_grow.py).
    store = await Store.open(fault_url, min_size=2, max_size=6, timeout=3, statement_timeout=1)
    server, port = await build_server(Config(host="127.0.0.1", port=0), store)
    await server.start()
    watcher = asyncio.create_task(watch_database(store, interval=0.2))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            noticed, _ = await _silence_shows_in_health(restartable, channel)
    finally:
        watcher.cancel()
        await server.stop(None)
        await store.close()
    assert noticed < PING_ANSWER_SECONDS + 3.0, noticed
    record("silent_database_health_short_timeout", seconds_to_notice=round(noticed, 2))


async def _silence_shows_in_health(
    restartable: EmbeddedPostgres, channel: grpc.aio.Channel
) -> tuple[float, float]:
    """Stops every process of `restartable` until the services behind `channel` say
    NOT_SERVING (a call then fails at once), resumes them, waits for SERVING; returns the
    seconds each took."""
    postmaster = psutil.Process(restartable.pid)
    processes = [postmaster, *postmaster.children(recursive=True)]
    assert await _services_are(channel, SERVING)
    for process in processes:
        process.suspend()
    try:
        noticed = await _wait_for(lambda: _services_are(channel, NOT_SERVING), 30)
        users = Users(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await users.GetUser(upb.GetUserRequest(user_id="anyone"), timeout=DEADLINE)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 1.0, "a call waited on the silent database"
    finally:
        for process in processes:
            process.resume()
    healed = await _wait_for(lambda: _services_are(channel, SERVING), limit=30)
    return noticed, healed


class _RequestIds(logging.Handler):
    """Each record's logger, message and the request id in force where it was logged (what
    the log's writer reads for it: serving/log_output.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.getMessage(), request_id.get()))


async def test_the_probe_logs_without_the_request_id_of_the_call_that_found_the_outage(
    restartable: EmbeddedPostgres, fault_channel: grpc.aio.Channel
) -> None:
    # The probe began as a copy of the context of the call that found the database gone, so
    # its lines, "PostgreSQL answers again" seconds later, carried that call's request id,
    # which the client chooses: a trace of one call claimed the recovery of the process.
    users = Users(fault_channel)
    captured = _RequestIds()
    logging.getLogger().addHandler(captured)
    try:
        await asyncio.to_thread(restartable.stop_server)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                # Not GetUser: its read runs in a batch (store/coalesce.py), in a context of
                # its own, so the probe it starts would carry no call's id either way.
                request = upb.UpdateUserRequest(user_id="anyone", email="a@b.c")
                metadata = (("x-request-id", "CALLER-7"),)
                await users.UpdateUser(request, metadata=metadata, timeout=DEADLINE)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await asyncio.to_thread(restartable.start_server)

        async def answered() -> bool:
            return any("answers again after" in message for _, message, _ in captured.lines)

        await _wait_for(answered, limit=30)
    finally:
        logging.getLogger().removeHandler(captured)
    probe = [line for line in captured.lines if "answers again after" in line[1]]
    assert probe and all(rid == "" for _, _, rid in probe), captured.lines
