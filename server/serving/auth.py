"""API key authentication: who may call, in which project, and the gate that enforces it."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from server import api_keys as keys
from server.api.status import abort
from server.config import Config
from server.domain import DEFAULT_PROJECT_ID
from server.errors import MemstoreError, Unauthenticated
from server.serving.tls import is_loopback
from server.store import Store

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Metadata = Sequence[tuple[str, str | bytes]] | grpc.aio.Metadata

#: Methods every caller may use without a key: health checks, and reflection (it shows the
#: public API schema only, never data).
OPEN_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
#: Schemes of the authorization header that carry an API key.
_SCHEMES = ("bearer", "api-key")
#: Keys kept in the cache at most; the oldest go first.
_CACHE_SIZE = 4096


# Made afresh at each refusal, never one object raised again: Python adds the frames of each
# raise to an exception's __traceback__, so a shared one kept every refused call's frames
# (and requests) alive, ~5 KB a call without bound (a review: 85 -> 187 MB over 20,000 calls
# with a wrong key).
def missing() -> Unauthenticated:
    """The refusal of a call that carries no key."""
    return Unauthenticated(
        "no API key: send 'authorization: Bearer <key>' (or 'Api-Key <key>', or 'x-api-key: "
        "<key>') as gRPC metadata or an HTTP header",
        reason="API_KEY_MISSING",
    )


def invalid() -> Unauthenticated:
    """The refusal of a key: one message for unknown, revoked and malformed keys alike, no
    hint which it was."""
    return Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")


_PROJECT: contextvars.ContextVar[int] = contextvars.ContextVar("memstore_project")


def current_project() -> int:
    """The project of the call being served, as AuthGate resolved it.

    Raises:
        Unauthenticated: no project was resolved (fail closed: never a silent default).
    """
    try:
        return _PROJECT.get()
    except LookupError:
        raise invalid() from None


class StartupRefused(RuntimeError):
    """The configuration would expose data without authentication."""


@dataclass(frozen=True, slots=True)
class _Credential:
    text: str
    cache_key: bytes


def _credential(metadata: Metadata | None) -> _Credential | None:
    """The key a call presents; raises invalid() for a malformed or contradictory one."""
    found: set[str] = set()
    for name, value in metadata or ():
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if name in ("authorization", "x-api-key") and not text.strip():
            continue  # an empty header carries no key (a proxy's, say): as if not sent
        if name == "authorization":
            scheme, _, token = text.strip().partition(" ")
            # "Api-Key" is how Zep's 2.x SDKs send theirs (server/rest serves them).
            if scheme.lower() not in _SCHEMES or not token.strip():
                raise invalid()
            found.add(token.strip())
        elif name == "x-api-key":
            found.add(text.strip())
    if not found:
        return None
    if len(found) > 1:
        raise invalid()  # two different keys: refuse rather than guess which one counts
    text = found.pop()
    return _Credential(text, hashlib.sha256(text.encode("utf-8", "replace")).digest())


class Authenticator:
    """Resolves a call's metadata to its project, with a short-lived cache of checked keys.

    Authentication is on as soon as any API key exists (revoked ones count, so revoking
    every key locks callers out instead of opening the server). Until then calls run in the
    default project; a key not presented before, or every `cache_seconds`, makes it look
    again. A key presented while none existed cannot be one made since (a made key's secret
    is new), so it is looked for once, not at every call: Zep's SDKs send a key with every
    call, and each ran a statement (and each message of a stream) with authentication off.
    """

    def __init__(self, store: Store, cache_seconds: float, *, enabled: bool) -> None:
        self._store = store
        self._ttl = cache_seconds
        self._enabled = enabled
        self._checked_at = time.monotonic()
        self._cache: OrderedDict[bytes, tuple[int, float]] = OrderedDict()
        #: Keys refused (their cache keys), until when. Apart from the checked keys, so that
        #: refused ones, however many, never push a good key out of its cache.
        self._refused: OrderedDict[bytes, float] = OrderedDict()
        #: Keys presented while no key existed (their cache keys), the most recent last.
        self._open_keys: OrderedDict[bytes, None] = OrderedDict()

    @property
    def enabled(self) -> bool:
        """Whether calls need a key (as last seen)."""
        return self._enabled

    async def project_for(self, metadata: Metadata | None) -> int:
        """The project a call's metadata reaches.

        Raises:
            Unauthenticated: auth is on and the key is missing, unknown, revoked or malformed.
            Unavailable: the database cannot be reached to check the key.
        """
        credential = _credential(metadata)
        new_key = credential is not None and credential.cache_key not in self._open_keys
        if not await self._auth_on(force=new_key):
            if credential is not None:
                _remember(self._open_keys, credential.cache_key, None)
            return DEFAULT_PROJECT_ID
        if credential is None:
            raise missing()
        now = time.monotonic()
        cached = self._cache.get(credential.cache_key)
        if cached is not None and cached[1] > now:
            return cached[0]
        # A refused key is refused again without a statement for `cache_seconds`: a client
        # left with a revoked or mistyped key cost a query and a hash per call (an audit). It
        # cannot become good meanwhile: a made key's secret is new.
        refused_until = self._refused.get(credential.cache_key)
        if refused_until is not None and refused_until > now:
            raise invalid()
        try:
            project = await self._check(credential.text)
        except Unauthenticated:
            _remember(self._refused, credential.cache_key, now + self._ttl)
            raise
        _remember(self._cache, credential.cache_key, (project, now + self._ttl))
        return project

    async def _auth_on(self, *, force: bool) -> bool:
        # Keys are never deleted, so once on, auth stays on for the life of the process.
        if self._enabled:
            return True
        now = time.monotonic()
        if force or now - self._checked_at >= self._ttl:
            self._checked_at = now
            # One way only: a look that began before the first key was made may answer
            # after one that saw it, and must not turn authentication off again.
            if await self._store.any_api_key() and not self._enabled:
                self._enabled = True
                log.info("an API key exists: authentication is now required")
        return self._enabled

    async def _check(self, text: str) -> int:
        parts = keys.split_key(text)
        if parts is None:
            raise invalid()
        stored = await self._store.find_api_key(parts[0])
        # An unknown prefix and a wrong secret cost the same hash and compare.
        candidate = stored or _DECOY
        if not keys.matches(candidate, parts[1]) or stored is None or stored.revoked:
            raise invalid()
        return stored.project_id


def _remember(cache: OrderedDict[bytes, Any], key: bytes, value: Any) -> None:
    """Keeps `key` in `cache` as its most recent entry, dropping the oldest past _CACHE_SIZE."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


_DECOY = keys.StoredKey(project_id=0, salt=b"\0" * 16, digest=b"\0" * 32, revoked=True)


async def start_authenticator(config: Config, store: Store) -> Authenticator:
    """The authenticator for this server; refuses an open non-loopback bind.

    Raises:
        StartupRefused: no API key exists, --insecure is not given, and the bind is not
            loopback and no client certificates are required, or every origin may call
            (--http-cors-origin '*').
    """
    sec = config.security
    enabled = await store.any_api_key()
    loopback = is_loopback(config.host)
    if not enabled:
        if not (loopback or sec.insecure or sec.tls_client_ca):
            raise StartupRefused(
                f"refusing to serve {config.host} without authentication: create an API key "
                "(memstore keys create --project default), require client certificates "
                "(--tls-client-ca), or pass --insecure (MEMSTORE_INSECURE=true)"
            )
        if config.http_cors_origin == ("*",) and not sec.insecure:
            raise StartupRefused(
                "refusing --http-cors-origin '*' without authentication: every web page a "
                "browser here opens could read and change all data; create an API key, name "
                "the origins, or pass --insecure (MEMSTORE_INSECURE=true)"
            )
        log.warning(
            "no API key exists: serving without authentication, every call in the default "
            "project (memstore keys create --project NAME turns authentication on)%s",
            f"; pages of {', '.join(config.http_cors_origin)} may call it from browsers"
            if config.http_cors_origin
            else "",
        )
    if not loopback and sec.tls_cert is None:
        log.warning("serving %s without TLS: keys and data cross the network in clear", config.host)
    return Authenticator(store, sec.key_cache_seconds, enabled=enabled)


class AuthGate:
    """Resolves each call's project before its handler runs; re-checks keys while streaming.

    Applied to each method's handler once, at registration (serving/services.py), inside the
    observed call, so refused calls are counted and logged too.
    """

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def enter(self, context: Context, metadata: Metadata | None) -> int:
        """The call's project, also set for its handler (`current_project`); aborts the call
        with UNAUTHENTICATED (or UNAVAILABLE) when its metadata reaches none."""
        try:
            project = await self._auth.project_for(metadata)
        except MemstoreError as error:
            await abort(context, error)
        # Each call runs in a context of its own (grpc.aio gives every RPC a fresh one), so
        # the handler, and nothing else, sees this project.
        _PROJECT.set(project)
        return project

    async def recheck(
        self,
        responses: AsyncGenerator[Any, None],
        context: Context,
        metadata: Metadata | None,
        project: int,
    ) -> AsyncGenerator[Any, None]:
        """`responses` of a call that entered with `project`, its key checked again before
        each message."""
        async with contextlib.aclosing(responses):
            async for response in responses:
                # A key revoked mid-stream ends the stream before its next message,
                # once the cached check expires (key_cache_seconds).
                try:
                    if await self._auth.project_for(metadata) != project:
                        raise invalid()
                except MemstoreError as error:
                    await abort(context, error)
                yield response
