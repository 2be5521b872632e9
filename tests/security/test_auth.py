"""Who gets in: missing, bad, revoked and good keys; open methods; open mode and its limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memstore.v1 import user_service_pb2 as us
from memstore.v1 import user_service_pb2_grpc
from server import config as config_module
from server.__main__ import _parser
from server.api_keys import StoredKey, new_key, prefix_start, split_key
from server.config import Config
from server.domain import DEFAULT_PROJECT_ID
from server.errors import InvalidArgument, Unauthenticated
from server.serving.app import build_server
from server.serving.auth import Authenticator, StartupRefused, start_authenticator
from server.serving.tls import SecurityConfig, is_loopback, reflection_enabled
from server.store import Store
from tests.fix_security import KEY_CACHE_SECONDS, Caller, make_key
from tests.grpc import Code, rpc_error

INVALID_MESSAGE = "the API key is not valid"


def _prefix(key: str) -> str:
    parts = split_key(key)
    assert parts is not None
    return parts[0]


async def _get(caller: Caller, metadata: tuple[tuple[str, str], ...]) -> object:
    return await caller.users.GetUser(us.GetUserRequest(user_id="anyone"), metadata=metadata)


async def test_missing_key_is_unauthenticated(a: Caller) -> None:
    error = await rpc_error(_get(a, ()), Code.UNAUTHENTICATED, reason="API_KEY_MISSING")
    assert "authorization: Bearer" in (error.details() or "")


async def test_bad_and_revoked_keys_get_one_and_the_same_answer(
    a: Caller, secure_store: Store
) -> None:
    revoked = await make_key(secure_store, "a")
    prefix = _prefix(revoked)
    await secure_store.revoke_api_key(prefix)
    unknown = new_key().text  # well-formed, never stored
    wrong_secret = prefix + "_" + "A" * 43  # a real prefix with a wrong secret
    cases = {
        "revoked": revoked,
        "unknown": unknown,
        "wrong secret": wrong_secret,
        "garbage": "hunter2",
        "sql": "msk_' OR '1'='1",
        "oversized": "msk_" + "a" * 4000,
    }
    for name, key in cases.items():
        for metadata in ((("authorization", f"Bearer {key}"),), (("x-api-key", key),)):
            error = await rpc_error(
                _get(a, metadata), Code.UNAUTHENTICATED, reason="API_KEY_INVALID"
            )
            assert error.details() == INVALID_MESSAGE, name
    # Not a bearer token, or two different keys at once: refused the same way.
    for metadata in (
        (("authorization", f"Basic {a.key}"),),
        (("authorization", f"Bearer {a.key}"), ("x-api-key", unknown)),
    ):
        error = await rpc_error(_get(a, metadata), Code.UNAUTHENTICATED, reason="API_KEY_INVALID")
        assert error.details() == INVALID_MESSAGE


async def test_a_good_key_works_in_either_header(a: Caller) -> None:
    await a.users.CreateUser(us.CreateUserRequest(user_id="kim"), metadata=a.metadata)
    for metadata in (
        (("authorization", f"Bearer {a.key}"),),
        (("authorization", f"bearer   {a.key}"),),
        (("x-api-key", a.key),),
        (("authorization", f"Bearer {a.key}"), ("x-api-key", a.key)),
        # An empty header (a proxy's, say) carries no key: the other one counts.
        (("authorization", ""), ("x-api-key", a.key)),
        (("authorization", f"Bearer {a.key}"), ("x-api-key", "  ")),
    ):
        got = await a.users.GetUser(us.GetUserRequest(user_id="kim"), metadata=metadata)
        assert got.user.user_id == "kim"
    # Alone, an empty header is no key at all: the caller is told how to send one.
    for metadata in ((("authorization", ""),), (("x-api-key", ""),)):
        await rpc_error(_get(a, metadata), Code.UNAUTHENTICATED, reason="API_KEY_MISSING")


async def test_revoked_key_stops_working_within_the_cache_bound(
    a: Caller, secure_store: Store
) -> None:
    key = await make_key(secure_store, "a")
    metadata = (("authorization", f"Bearer {key}"),)
    await a.users.ListUsers(us.ListUsersRequest(), metadata=metadata)
    await secure_store.revoke_api_key(_prefix(key))
    await asyncio.sleep(KEY_CACHE_SECONDS * 2)
    await rpc_error(
        a.users.ListUsers(us.ListUsersRequest(), metadata=metadata),
        Code.UNAUTHENTICATED,
        reason="API_KEY_INVALID",
    )


async def test_health_and_reflection_need_no_key(secure_channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(secure_channel)
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(secure_channel)
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = [s.name async for r in call for s in r.list_services_response.service]
    assert "memstore.v1.UserService" in names


def test_key_format() -> None:
    key = new_key()
    parts = split_key(key.text)
    assert parts is not None and parts[0] == key.prefix
    assert key.text.startswith("msk_") and len(key.text) == 4 + 12 + 1 + 43
    assert key.digest != new_key().digest
    assert split_key(key.text + "x") is None
    assert split_key(key.text.replace("_", "-", 1)) is None
    assert split_key(key.text + "\n") is None  # $ matches before a final newline
    with pytest.raises(InvalidArgument):
        prefix_start(key.prefix + "\n")  # said to name no key, though it named one
    assert prefix_start(key.prefix[:8]) == key.prefix[:8]


async def test_keys_are_stored_as_salted_hashes_only(
    secure_store: Store, secure_db_url: str
) -> None:
    key = new_key()
    await secure_store.create_api_key("b", key, "hash check")
    parts = split_key(key.text)
    assert parts is not None
    secret = parts[1]
    async with await psycopg.AsyncConnection.connect(secure_db_url) as conn:
        cur = await conn.execute("SELECT * FROM api_keys WHERE prefix = %s", (key.prefix,))
        row = await cur.fetchone()
        cur = await conn.execute("SELECT count(DISTINCT salt) = count(*) FROM api_keys")
        distinct = await cur.fetchone()
    assert row is not None and distinct == (True,)
    stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
    assert secret.encode() not in stored and key.text.encode() not in stored
    listed = await secure_store.list_api_keys("b")
    assert key.prefix in [k.prefix for k in listed]


def test_loopback_rule() -> None:
    for host in ("localhost", "127.0.0.1", "127.8.9.10", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "[::]", "10.1.2.3", "example.com", ""):
        assert not is_loopback(host), host


def test_reflection_is_on_by_default_only_for_a_loopback_bind() -> None:
    assert reflection_enabled(None, "localhost") and reflection_enabled(None, "127.0.0.1")
    assert not reflection_enabled(None, "0.0.0.0")
    assert reflection_enabled(True, "0.0.0.0") and not reflection_enabled(False, "localhost")


async def test_open_mode_only_on_loopback_unless_insecure(store: Store) -> None:
    # The run's shared database has no key: the open mode of every other test.
    assert not await store.any_api_key()
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        with pytest.raises(StartupRefused, match="--insecure"):
            await build_server(Config(host=host, port=0), store)
        insecure = Config(host=host, port=0, security=SecurityConfig(insecure=True))
        assert not (await start_authenticator(insecure, store)).enabled
        # Required client certificates authenticate the caller: allowed too (README).
        mtls = Config(host=host, port=0, security=SecurityConfig(tls_client_ca=Path("ca.pem")))
        assert not (await start_authenticator(mtls, store)).enabled
    open_ = await start_authenticator(Config(host="127.0.0.1"), store)
    assert not open_.enabled
    assert await open_.project_for(()) == DEFAULT_PROJECT_ID


class _Counted:
    """A store whose any_api_key statements are counted."""

    def __init__(self, store: Store) -> None:
        self.store, self.statements = store, 0

    async def any_api_key(self) -> bool:
        self.statements += 1
        return await self.store.any_api_key()


async def test_open_mode_looks_for_keys_once_per_presented_key(store: Store) -> None:
    # With no key made, a call presenting one (Zep's SDKs send theirs with every call) ran
    # any_api_key each time: a statement per call, and per message of a stream.
    counted = _Counted(store)
    auth = Authenticator(counted, 60.0, enabled=False)  # type: ignore[arg-type]
    sdk, other = (("authorization", "Api-Key placeholder"),), (("x-api-key", "another"),)
    for _ in range(50):
        assert await auth.project_for(sdk) == DEFAULT_PROJECT_ID
        assert await auth.project_for(()) == DEFAULT_PROJECT_ID
    assert counted.statements == 1
    # A key not presented before is looked for at once: it may be one made since.
    assert await auth.project_for(other) == DEFAULT_PROJECT_ID
    assert counted.statements == 2


class _KeyMadeLater:
    """A store in which `key` (of project 7) exists once `made` is set."""

    def __init__(self) -> None:
        self.key, self.made = new_key(), False

    async def any_api_key(self) -> bool:
        return self.made

    async def find_api_key(self, prefix: str) -> StoredKey | None:
        if not self.made or prefix != self.key.prefix:
            return None
        return StoredKey(project_id=7, salt=self.key.salt, digest=self.key.digest, revoked=False)


async def test_a_key_made_after_another_was_presented_works_at_once() -> None:
    # The open mode looks for keys once per presented key: a key made since is new to it.
    store = _KeyMadeLater()
    auth = Authenticator(store, 60.0, enabled=False)  # type: ignore[arg-type]
    assert await auth.project_for((("authorization", "Api-Key placeholder"),)) == DEFAULT_PROJECT_ID
    store.made = True
    assert await auth.project_for((("authorization", f"Bearer {store.key.text}"),)) == 7
    with pytest.raises(Unauthenticated, match="not valid"):
        await auth.project_for((("authorization", "Api-Key placeholder"),))


class _CountedLookups(_KeyMadeLater):
    """_KeyMadeLater, made, counting its key lookups."""

    def __init__(self) -> None:
        super().__init__()
        self.made, self.lookups = True, 0

    async def find_api_key(self, prefix: str) -> StoredKey | None:
        self.lookups += 1
        return await super().find_api_key(prefix)


async def test_a_refused_key_is_refused_again_without_a_lookup() -> None:
    # A client left with a revoked or mistyped key cost a statement and a hash per call.
    store = _CountedLookups()
    auth = Authenticator(store, 60.0, enabled=True)  # type: ignore[arg-type]
    wrong = store.key.text[:-4] + ("AAAA" if not store.key.text.endswith("AAAA") else "BBBB")
    for _ in range(20):
        with pytest.raises(Unauthenticated, match="not valid"):
            await auth.project_for((("authorization", f"Bearer {wrong}"),))
    assert store.lookups == 1
    # The good key of the same prefix is looked up and served, as before.
    for _ in range(20):
        assert await auth.project_for((("authorization", f"Bearer {store.key.text}"),)) == 7
    assert store.lookups == 2


class _SlowFirstLook(_KeyMadeLater):
    """A store whose first any_api_key reads before the key is made and answers last."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.release = True, asyncio.Event()

    async def any_api_key(self) -> bool:
        if self.first:
            self.first = False
            await self.release.wait()
            return False  # what it read, before the key was made
        return self.made


async def test_a_slow_look_for_keys_never_turns_authentication_off_again() -> None:
    # A keyless call's periodic look began before the first key was made and answered after
    # a call presenting that key turned authentication on: it set it off again, and keyless
    # calls were served in the default project until the next look.
    store = _SlowFirstLook()
    auth = Authenticator(store, 0.0, enabled=False)  # type: ignore[arg-type]
    slow = asyncio.ensure_future(auth.project_for(()))
    await asyncio.sleep(0)  # the slow look is under way
    store.made = True
    assert await auth.project_for((("authorization", f"Bearer {store.key.text}"),)) == 7
    store.release.set()
    with pytest.raises(Unauthenticated):  # decided after authentication was on
        await slow
    with pytest.raises(Unauthenticated):
        await auth.project_for(())


async def test_first_key_turns_authentication_on(secure_store: Store) -> None:
    # A server that started open (enabled=False) honours a key made afterwards at once.
    auth = Authenticator(secure_store, 60.0, enabled=False)
    key = await make_key(secure_store, "b")
    projects = {p.name: p.project_id for p in await secure_store.list_projects()}
    assert await auth.project_for((("authorization", f"Bearer {key}"),)) == projects["b"]
    assert auth.enabled
    with pytest.raises(Exception, match="no API key"):
        await auth.project_for(())


async def test_a_key_reaches_only_its_own_project(
    a: Caller, b: Caller, secure_channel: grpc.aio.Channel
) -> None:
    await a.users.CreateUser(us.CreateUserRequest(user_id="only-a"), metadata=a.metadata)
    stub = user_service_pb2_grpc.UserServiceStub(secure_channel)
    listed = await stub.ListUsers(us.ListUsersRequest(), metadata=b.metadata)
    assert list(listed.users) == []


def test_security_flags_and_environment_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = [
        "serve",
        "--host=0.0.0.0",
        "--insecure",
        "--tls-cert=s.pem",
        "--tls-key=s.key",
        "--tls-client-ca=ca.pem",
        "--key-cache-seconds=0.5",
        "--pool-max-waiting=3",
        "--no-reflection",
    ]
    config = config_module.from_arguments(_parser().parse_args(flags))
    sec = config.security
    assert (sec.insecure, str(sec.tls_cert), str(sec.tls_key), str(sec.tls_client_ca)) == (
        True,
        "s.pem",
        "s.key",
        "ca.pem",
    )
    assert (sec.key_cache_seconds, sec.pool_max_waiting, config.reflection) == (0.5, 3, False)
    # Unset, reflection follows the bind; the environment gives every default.
    assert config_module.from_arguments(_parser().parse_args(["serve"])).reflection is None
    monkeypatch.setenv("MEMSTORE_TLS_CERT", "env.pem")
    monkeypatch.setenv("MEMSTORE_POOL_MAX_WAITING", "7")
    monkeypatch.setenv("MEMSTORE_REFLECTION", "1")
    config = config_module.from_arguments(_parser().parse_args(["serve"]))
    assert str(config.security.tls_cert) == "env.pem"
    assert config.security.pool_max_waiting == 7 and config.reflection is True


async def test_refusals_hold_no_earlier_call_alive() -> None:
    # One Unauthenticated object was raised at every refusal: each raise added its frames to
    # the object's __traceback__, which grew by a call's frames (and requests) every time,
    # ~5 KB a refused call without bound (a review: 85 -> 187 MB over 20,000 calls).
    store = _CountedLookups()
    auth = Authenticator(store, 60.0, enabled=True)  # type: ignore[arg-type]
    depths: list[int] = []
    for metadata in [(("authorization", "Bearer msk_nothing"),), ()] * 50:
        with pytest.raises(Unauthenticated) as refused:
            await auth.project_for(metadata)
        depth, frame = 0, refused.value.__traceback__
        while frame is not None:
            depth, frame = depth + 1, frame.tb_next
        depths.append(depth)
    assert max(depths) <= 5, depths
