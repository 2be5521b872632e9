"""`memstore serve --workers N`: several processes on one port, one clean exit on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc

from memstore.v1 import user_service_pb2, user_service_pb2_grpc
from tests.processes import run_memstore, serve_memstore, stop_memstore

_ESTABLISHED = "01"
_LISTEN = "0A"


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(match.group(1))
    return inodes


def _sockets(pid: int, port: int, state: str) -> int:
    """TCP sockets on local `port` in `state` (hex, as /proc/net/tcp) that process `pid` holds."""
    mine = _socket_inodes(pid)
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == state and fields[9] in mine:
                count += 1
    return count


def _listeners(port: int) -> int:
    """TCP sockets anyone holds listening on local `port`."""
    tables = (Path(t).read_text().splitlines()[1:] for t in ("/proc/net/tcp", "/proc/net/tcp6"))
    rows = [line.split() for table in tables for line in table]
    return sum(int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == _LISTEN for f in rows)


def _wait_listening(pids: list[int], port: int, timeout: float = 30.0) -> None:
    # One worker answering health does not mean the other has bound the port yet.
    deadline = time.monotonic() + timeout
    while not all(_sockets(pid, port, _LISTEN) for pid in pids):
        assert time.monotonic() < deadline, "not every worker listens on the port"
        time.sleep(0.05)


def test_two_workers_share_the_port_and_exit_zero_on_sigterm(clean_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    proc, port = serve_memstore(
        "--workers", "2", "--purge-interval", "0", "--grace-period", "5", env=env
    )
    channels = [
        # A local subchannel pool gives each channel its own TCP connection.
        grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(16)
    ]
    try:
        workers = _children(proc.pid)
        assert len(workers) == 2
        _wait_listening(workers, port)
        for i, channel in enumerate(channels):
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            stub.CreateUser(user_service_pb2.CreateUserRequest(user_id=f"w{i}"), timeout=10)
        # The kernel spread the 16 connections over both workers (all on one: p = 2**-15).
        served = [_sockets(pid, port, _ESTABLISHED) for pid in workers]
        assert all(n > 0 for n in served), served
        assert sum(served) >= len(channels)
        # Every worker reads the same database: each user is visible through any connection.
        stub = user_service_pb2_grpc.UserServiceStub(channels[0])
        listed = stub.ListUsers(user_service_pb2.ListUsersRequest(page_size=100), timeout=10)
        assert sorted(u.user_id for u in listed.users) == sorted(f"w{i}" for i in range(16))
    finally:
        for channel in channels:
            channel.close()
        code, out = stop_memstore(proc)
    assert code == 0, out
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie not yet reaped by its new parent counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, [pid for pid in pids if not _gone(pid)]
        time.sleep(0.05)


def test_a_worker_that_dies_takes_the_others_down_and_the_parent_exits_1(clean_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    proc, port = serve_memstore(
        "--workers", "2", "--purge-interval", "0", "--grace-period", "5", env=env
    )
    try:
        workers = _children(proc.pid)
        assert len(workers) == 2
        _wait_listening(workers, port)
        os.kill(workers[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            stop_memstore(proc)
    assert proc.returncode == 1, out
    assert f"worker {workers[0]} exited with -9; stopping the others" in out, out
    assert _gone(workers[1])


def test_workers_stop_when_their_parent_is_killed(clean_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    proc, port = serve_memstore(
        "--workers", "2", "--purge-interval", "0", "--grace-period", "2", "--drain-delay", "0",
        env=env,
    )  # fmt: skip
    workers = _children(proc.pid)
    try:
        assert len(workers) == 2
        _wait_listening(workers, port)
        proc.kill()  # SIGKILL: the parent forwards nothing
        proc.wait(timeout=30)
        # PR_SET_PDEATHSIG sends each worker SIGTERM: it drains (2 s) and exits.
        _wait_gone(workers, timeout=30)
    finally:
        for pid in workers:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=30)  # the workers held its output open
    assert not _listeners(port)  # nobody serves the port any more


def test_workers_refuse_a_taken_port(clean_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    proc, port = serve_memstore("--purge-interval", "0", env=env)
    try:
        # gRPC itself would share the port under SO_REUSEPORT; the parent's probe refuses.
        run = run_memstore(
            "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2", env=env
        )
        assert run.returncode == 1
        assert "cannot listen" in run.stderr
        assert "Traceback" not in run.stderr
    finally:
        code, out = stop_memstore(proc)
    assert code == 0, out


def test_workers_flag_rejects_zero() -> None:
    run = run_memstore("serve", "--workers", "0")
    assert run.returncode == 2
    assert "--workers" in run.stderr
