"""hypothesis drives every route of Zep's REST API with hostile input over real HTTP.

A `memstore serve` process serves the routes; each test sends batches of hostile requests
(path params, query params, JSON bodies, raw bodies and content types) to one route and
checks every answer: never a 5xx (but the 501 of a route memstore does not serve), only a
status the error table allows, a JSON error body, a violation naming the offending field,
nothing half-written, and no unexpected exception in the server's log.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.routing import Route

from server.rest import routes as rest_routes
from server.rest import unserved
from server.rest.app import MAX_BODY_BYTES
from server.rest.routing import Services, build_app
from tests.processes import MEMSTORE, ROOT, _wait_serving, free_port
from tests.reliability import fuzz_settings, hostile, record
from tests.reliability.test_fuzz import check_consistent

#: Requests sent concurrently per hypothesis example.
BATCH = 6
#: A request slower than this has hung.
TIMEOUT = 30.0
#: The statuses a served route may answer (docs/design.md's error table, HTTP column): the
#: 503, 504 and 429 of an outage or overload, and 401 without keys, are not expected here.
SERVED = {200, 201, 307, 400, 404, 405, 413, 415}
#: The content types a body is read as (server/rest/media.py); any other is a 415.
JSON_TYPES = {
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=utf8",
    'application/json; charset="UTF8"',
    "",
}
#: Reasons a 400 may carry: a bad field, or (Zep's status for them) a taken id or a missing
#: parent.
REASONS_400 = {
    "INVALID_ARGUMENT",
    "USER_ALREADY_EXISTS",
    "SESSION_ALREADY_EXISTS",
    "SESSION_DELETED",
    "MESSAGE_ALREADY_EXISTS",
    "USER_NOT_FOUND",
    "SESSION_USER_MISMATCH",
    "SEMANTIC_UNAVAILABLE",
}
#: Body members a route requires: an error may name them though the request left them out.
REQUIRED = {"user_id", "session_id", "messages", "text"}
#: Messages the fuzz seeds (3 in each of three sessions).
SEEDED_MESSAGES = 9

# The server's process draws no randomness here, but hypothesis' warnings about threads
# drawing from `random` (httpx' pool) are noise, as in test_fuzz.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")


@dataclass(frozen=True)
class Endpoint:
    """One route the app registers: its path template and the methods it serves."""

    path: str
    methods: tuple[str, ...]

    @property
    def params(self) -> list[str]:
        """The path parameters, e.g. ["session_id", "message_uuid"]."""
        return re.findall(r"{(\w+)(?::\w+)?}", self.path)

    @property
    def unserved(self) -> bool:
        """A Zep route memstore answers 501 on (server/rest/unserved.py)."""
        return self.path in UNSERVED_PATHS


def _endpoints() -> list[Endpoint]:
    # From the app as built, so a new route is fuzzed without a change here.
    app = build_app(rest_routes(), cast(Services, None))
    found = []
    for route in app.routes:
        assert isinstance(route, Route), route
        methods = tuple(sorted((route.methods or set()) - {"HEAD"}))
        found.append(Endpoint(route.path, methods))
    return found


#: The routes of Zep's API memstore does not serve: every method answers 501.
UNSERVED_PATHS = frozenset(r.path for r in unserved.routes() if isinstance(r, Route))
ENDPOINTS = _endpoints()


@dataclass
class Served:
    """The `memstore serve` process the tests talk to, and what it has been sent."""

    base_url: str
    database_url: str
    log: Path
    client: httpx.Client


@pytest.fixture(scope="module")
def served(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`memstore serve` with the REST API, its output in a file the tests read."""
    http_port = free_port()
    port = free_port()
    log = tmp_path_factory.mktemp("rest-fuzz") / "server.log"
    env = {**os.environ, "DATABASE_URL": database_url, "MEMSTORE_LOG_LEVEL": "WARNING"}
    cmd = [*MEMSTORE, "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--http-port", str(http_port), "--no-embedding-worker", "--purge-interval", "0"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_serving(port, cast(Any, proc))
        with httpx.Client(timeout=TIMEOUT, limits=httpx.Limits(max_connections=BATCH)) as client:
            yield Served(f"http://127.0.0.1:{http_port}", database_url, log, client)
    finally:
        proc.terminate()
        proc.wait(30)


# -- hostile values -------------------------------------------------------------------------

_lone = st.sampled_from(["\ud800", "\udfff", "a\udc80b"])
#: Text a JSON body may carry that gRPC cannot: lone surrogates (sent as \ud800 escapes).
_text = st.one_of(
    hostile.short_texts,
    st.text(st.characters(codec="utf-8"), max_size=10).flatmap(lambda t: _lone.map(t.__add__)),
)
#: Numbers past every limit: int64 and beyond, floats past a double.
_numbers = st.one_of(
    st.sampled_from([-1, 0, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 10**400]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(),
)
_wrong = st.one_of(
    st.none(),
    st.booleans(),
    _numbers,
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from("ab"), st.integers(0, 3), max_size=2),
    _text,
)


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"d": value}
    return value


_metadata = st.one_of(
    st.dictionaries(st.sampled_from(["a", "b", "\x00", "\ud800"]), _wrong, max_size=3),
    st.sampled_from([30, 33, 200]).map(_nested),
    hostile.rare(st.just({"big": "m" * (64 * 1024)}), st.just({"k": 1})),
    _wrong,
)


def _plausible_or(plausible: st.SearchStrategy[Any], hostile_: st.SearchStrategy[Any]) -> Any:
    return hostile.rare(hostile_, plausible, one_in=4)


_ids = st.one_of(
    st.sampled_from([hostile.KNOWN_USER, hostile.KNOWN_SESSION, hostile.DELETED_SESSION]),
    st.integers(0, 30).map(lambda i: f"rest-{i}"),
)
_message = st.fixed_dictionaries(
    {},
    optional={
        "role": _plausible_or(st.sampled_from(["ann", "bot"]), _wrong),
        "role_type": _plausible_or(st.sampled_from(["user", "assistant", ""]), _wrong),
        "content": _plausible_or(st.sampled_from(["hello", "m0 m1"]), _wrong),
        "metadata": _plausible_or(st.just({"k": 1}), _metadata),
        "uuid": _plausible_or(st.uuids().map(str), _wrong),
    },
)
_messages = st.one_of(
    st.lists(_message, min_size=1, max_size=3),
    _wrong,
    hostile.rare(st.just([{"content": "m"}] * 1001), st.just([])),
)

#: Every body member Zep's routes read, each plausible or hostile.
BODY_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "user_id": _plausible_or(_ids, st.one_of(hostile.ids, _wrong)),
    "session_id": _plausible_or(_ids, st.one_of(hostile.ids, _wrong)),
    "email": _plausible_or(st.just("a@b.c"), _wrong),
    "first_name": _plausible_or(st.just("Ann"), _wrong),
    "last_name": _plausible_or(st.just("Lee"), _wrong),
    "metadata": _plausible_or(st.just({"k": "v"}), _metadata),
    "messages": _plausible_or(st.lists(_message, min_size=1, max_size=3), _messages),
    "text": _plausible_or(st.sampled_from(["hello", "m0"]), st.one_of(hostile.query_texts, _wrong)),
    "session_ids": _plausible_or(st.lists(_ids, max_size=2), _wrong),
    "search_scope": _plausible_or(st.sampled_from(["messages", ""]), _wrong),
    "search_type": _plausible_or(st.sampled_from(["similarity", "mmr", "full_text"]), _wrong),
    "mmr_lambda": _plausible_or(st.floats(0, 1), _numbers),
    "min_score": _plausible_or(st.floats(0, 1), _numbers),
    "record_filter": _wrong,
}
#: Every query parameter Zep's routes read.
QUERY_NAMES = [
    "limit", "cursor", "pageNumber", "pageSize", "page_number", "page_size", "lastn",
    "relevant_limit", "order_by", "asc",
]  # fmt: skip
_query_values = st.one_of(
    st.sampled_from(["", "0", "1", "5", "-1", "1000", "1001", "2147483648", "9" * 30]),
    st.sampled_from(["1e3", "1.5", "NaN", " 1", "true", "created_at", "updated_at", "%00"]),
    st.text(st.characters(codec="utf-8"), max_size=12).map(lambda t: quote(t, safe="")),
    st.just("%ED%A0%80"),  # a UTF-8-encoded lone surrogate: not UTF-8
)
#: The uuids of the messages of hostile.KNOWN_SESSION, as the test's seed made them.
KNOWN_UUIDS: list[str] = []
#: Users the seed makes with no sessions: a DELETE of one leaves the others to answer.
SPARE_USERS = ("fuzz-u1", "fuzz-u2", "fuzz-u3")
#: Ids of seeded rows for each path parameter: drawn from `_segments` alone, a path of two
#: parameters named a row too rarely for a message's route to answer anything but 400 and 404.
_PATH_IDS = {
    "user_id": st.sampled_from([hostile.KNOWN_USER, *SPARE_USERS]),
    "session_id": st.sampled_from([hostile.KNOWN_SESSION, hostile.DELETED_SESSION, "fuzz-s3"]),
    "message_uuid": hostile.current(KNOWN_UUIDS),
}
#: Path segments, already percent-encoded: known and new ids, and what ids must not be.
_segments = st.one_of(
    st.sampled_from([hostile.KNOWN_USER, hostile.KNOWN_SESSION, hostile.DELETED_SESSION]),
    st.integers(0, 30).map(lambda i: f"rest-{i}"),
    hostile.current(KNOWN_UUIDS),
    st.sampled_from(["%00", "a%00b", "%ED%A0%80", "%FF", "%20a", "a%20", "..", "%2E%2E", "a%2Fb"]),
    st.sampled_from(["%E2%80%AE", "a" * 256, "a" * 257, "i" * 5000, "%09", "%7F"]),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=20).map(lambda t: quote(t, safe="")),
)


@dataclass(frozen=True)
class Request:
    """One HTTP request, as sent."""

    method: str
    url: str
    body: bytes | None
    headers: dict[str, str]
    sent_fields: frozenset[str]

    def __repr__(self) -> str:  # hypothesis prints failing examples
        return f"{self.method} {self.url[:300]} {self.headers} {(self.body or b'')[:300]!r}"


_CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/json", "application/json; charset=utf-8",
     "application/json; charset=utf8", 'application/json; charset="UTF8"', "text/plain",
     "application/json; charset=latin-1", "application/x-www-form-urlencoded",
     "multipart/form-data; boundary=x", ""]
)  # fmt: skip


@st.composite
def _body(draw: st.DrawFn) -> tuple[bytes | None, frozenset[str]]:
    """A JSON object of Zep's members (mostly), or bytes that are not one."""
    shape = draw(st.sampled_from(["object"] * 6 + ["none", "raw"]))
    if shape == "none":
        return None, frozenset()
    if shape == "raw":
        raw = draw(
            st.one_of(
                st.sampled_from(
                    [
                        b"",
                        b"{",
                        b"[1]",
                        b'"s"',
                        b"null",
                        b"NaN",
                        b'{"a": NaN}',
                        b"\xff\xfe",
                        b'{"user_id": "a"}{}',
                        b'{"user_id": "\\ud800"}',
                        b'{"user_id": "a", "user_id": "b"}',
                        b"\x00",
                    ]
                ),
                st.integers(1000, 100_000).map(lambda n: b"[" * n + b"]" * n),
                st.integers(1000, 100_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
                st.binary(max_size=64),
            )
        )
        return raw, frozenset({"body"})
    names = draw(st.sets(st.sampled_from(sorted(BODY_FIELDS)), max_size=5))
    obj = {name: draw(BODY_FIELDS[name]) for name in sorted(names)}
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()), allow_nan=True)
    return text.encode("utf-8", "surrogatepass"), frozenset(names)


@st.composite
def requests_to(draw: st.DrawFn, endpoint: Endpoint) -> Request:
    """A hostile request to `endpoint`: its methods mostly, another now and then."""
    methods = list(endpoint.methods)
    method = draw(
        hostile.rare(
            st.sampled_from(["PUT", "DELETE", "POST", "GET"]), st.sampled_from(methods), 10
        )
    )
    path = endpoint.path
    for placeholder, name in re.findall(r"({(\w+)(?::\w+)?})", endpoint.path):
        # Half the time a seeded row's id: a bad segment is refused before anything else.
        ids = _PATH_IDS.get(name)
        segment = _segments if ids is None else hostile.rare(_segments, ids, 2)
        path = path.replace(placeholder, draw(segment))
    query = draw(
        st.lists(
            st.tuples(st.one_of(st.sampled_from(QUERY_NAMES), st.just("x")), _query_values),
            max_size=3,
        )
    )
    url = path + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")
    body, members = draw(_body()) if method in ("POST", "PATCH", "PUT") else (None, frozenset())
    headers = {"content-type": draw(_CONTENT_TYPES)} if body is not None else {}
    sent = members | {k for k, _ in query} | set(endpoint.params)
    return Request(method, url, body, headers, frozenset(sent))


# -- checks ---------------------------------------------------------------------------------


class Sender:
    """Sends batches of requests concurrently, checks every answer, counts them."""

    def __init__(self, served: Served, endpoint: Endpoint) -> None:
        self.served = served
        self.endpoint = endpoint
        self.statuses: Counter[int] = Counter()
        self.added = 0
        self.deleted_users = 0
        self._pool = ThreadPoolExecutor(BATCH)

    def close(self) -> None:
        """Ends the sending threads."""
        self._pool.shutdown()

    def send_all(self, batch: list[Request]) -> None:
        replies = list(self._pool.map(self._send, batch))
        for request, reply in zip(batch, replies, strict=True):
            self._check(request, reply)

    def _send(self, request: Request) -> httpx.Response:
        return self.served.client.request(
            request.method,
            self.served.base_url + request.url,
            content=request.body,
            headers=request.headers,
        )

    def _check(self, request: Request, reply: httpx.Response) -> None:
        status = reply.status_code
        self.statuses[status] += 1
        where = f"{request!r} -> {status} {reply.text[:500]}"
        # An unserved path may be a served route's too (PATCH /api/v2/sessions/end is
        # UpdateSession of session "end"), and a ".." segment leads elsewhere, as the client
        # resolves it: to any route, or none.
        allowed = SERVED | {501} if self.endpoint.unserved else SERVED
        assert status in allowed, where
        if self.endpoint.path == "/healthz" and status == 200:
            return
        if status == 307:  # Starlette's redirect to the same path with(out) a trailing slash
            target = httpx.URL(reply.headers["location"]).path
            assert target.rstrip("/") == reply.request.url.path.rstrip("/"), where
            return
        path = request.url.split("?")[0]
        if reply.headers.get("content-type", "").startswith("text/plain"):
            # Zep 0.27.2's plain OK: /api/v1's memory POST and DELETE, and only theirs.
            sent = reply.request.url.path  # as the client resolved it
            v1_memory = sent.startswith("/api/v1/") and sent.endswith("/memory")
            assert request.method in {"POST", "DELETE"} and v1_memory, where
            assert status == 200 and reply.text == "OK", where
            body: Any = {}
        else:
            body = reply.json()
        # A body not declared as JSON is never read as JSON (a route may refuse the request
        # for its path or method first), and only such a body is a 415.
        declared = request.headers.get("content-type", "")
        not_json = bool((request.body or b"").strip()) and declared not in JSON_TYPES
        assert status >= 400 if not_json else status != 415, where
        if status < 400:
            if request.method == "POST" and path.endswith("/memory"):
                self.added += len(json.loads(request.body or b"{}")["messages"])
            if request.method == "DELETE" and "/user" in path:
                self.deleted_users += 1  # with their sessions and messages, for good
            return
        assert body["message"] and body["reason"], where
        if status == 400:
            assert body["reason"] in REASONS_400, where
        if status == 415:
            assert body["reason"] == "UNSUPPORTED_MEDIA_TYPE", where
            assert [v["field"] for v in body["violations"]] == ["Content-Type"], where
        if body["reason"] == "INVALID_ARGUMENT":
            named = {re.split(r"[.\[]", v["field"], maxsplit=1)[0] for v in body["violations"]}
            assert named, where
            assert named <= request.sent_fields | REQUIRED | {"body"}, where


def _must_answer(endpoint: Endpoint) -> dict[str, set[int]]:
    """What `endpoint` answers the fuzz's requests at least once, each by its statuses.

    A success is asked of a route that serves GET (a path and a query to get right; a whole
    plausible body is drawn 1-3 times in 252 requests, too few to count on). Before, a 415 was
    allowed but never required, and the routes of a message never answered 200: the uuids
    drawn were those of the first test's seed."""
    must = {"405 (another method)": {405}}
    if "GET" in endpoint.methods:
        must["a success"] = {200}
    if endpoint.path != "/healthz":
        must["400 (a bad field)"] = {400}
    if set(endpoint.methods) & {"POST", "PATCH", "PUT"}:
        must["415 (a body not declared as JSON)"] = {415}
    return must


def _seed(served: Served) -> None:
    """A user, a live and a deleted session with messages, as test_fuzz seeds over gRPC, and
    the spare users."""
    post = served.client.post
    url = served.base_url + "/api/v2"
    for user in (hostile.KNOWN_USER, *SPARE_USERS):
        assert post(f"{url}/users", json={"user_id": user}).status_code == 201
    for name in (hostile.KNOWN_SESSION, hostile.DELETED_SESSION, "fuzz-s3"):
        body = {"session_id": name, "user_id": hostile.KNOWN_USER}
        assert post(f"{url}/sessions", json=body).status_code == 201
        messages = [{"role_type": "user", "content": f"m{i}"} for i in range(3)]
        assert post(f"{url}/sessions/{name}/memory", json={"messages": messages}).is_success
    reply = served.client.get(f"{url}/sessions/{hostile.KNOWN_SESSION}/messages")
    KNOWN_UUIDS[:] = [m["uuid"] for m in reply.json()["messages"]]
    deleted = served.client.delete(f"{url}/sessions/{hostile.DELETED_SESSION}/memory")
    assert deleted.is_success


def _check_log(served: Served, start: int) -> None:
    # A handler's unexpected exception is logged (and answered as a 500, checked above);
    # uvicorn logs what escaped the app altogether. `start`: the log's size before the test.
    with served.log.open("rb") as log:
        log.seek(start)
        text = log.read().decode(errors="replace")
    assert "Traceback" not in text and "unexpected error" not in text, text[-5000:]


def _check_written(served: Served, sender: Sender, url: str) -> None:
    check_consistent(url)
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM messages").fetchone()
    assert row is not None
    # Message uuids are the caller's, so a retried one is stored once: at most the
    # acknowledged messages, and none of a refused request; all of those unless a user was
    # deleted (with every message of its sessions).
    assert row[0] <= SEEDED_MESSAGES + sender.added, (row[0], sender.added)
    if not sender.deleted_users:
        assert row[0] >= SEEDED_MESSAGES + (sender.added > 0), (row[0], sender.added)


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if not e.unserved], ids=lambda e: e.path)
def test_fuzz_rest_route(served: Served, clean_db: str, endpoint: Endpoint) -> None:
    start = served.log.stat().st_size
    _seed(served)
    sender = Sender(served, endpoint)

    @fuzz_settings
    @given(batch=st.lists(requests_to(endpoint), min_size=BATCH, max_size=BATCH))
    def run(batch: list[Request]) -> None:
        sender.send_all(batch)

    run()
    sender.close()
    assert sum(sender.statuses.values()) >= fuzz_settings.max_examples * BATCH
    # What the requests must draw from the route, or the fuzz no longer reaches that part of
    # it (reproducible: the default profile draws the same inputs on every run, and the
    # explore profile 24 times as many).
    must = _must_answer(endpoint).items()
    missing = [what for what, codes in must if not codes & sender.statuses.keys()]
    assert not missing, f"never answered {missing}: {dict(sender.statuses)}"
    _check_written(served, sender, clean_db)
    _check_log(served, start)
    _record(endpoint, sender)


def test_fuzz_rest_unserved_routes(served: Served, clean_db: str) -> None:
    # One handler answers them all (a JSON 501): one test sends to every one of them.
    start = served.log.stat().st_size
    _seed(served)
    endpoints = [e for e in ENDPOINTS if e.unserved]
    sender = Sender(served, endpoints[0])
    requests = st.sampled_from(endpoints).flatmap(requests_to)

    @fuzz_settings
    @given(batch=st.lists(requests, min_size=BATCH, max_size=BATCH))
    def run(batch: list[Request]) -> None:
        sender.send_all(batch)

    run()
    sender.close()
    assert sender.statuses[501] > 0
    _check_log(served, start)
    _record(endpoints[0], sender)


def test_bodies_over_16_mib_are_413_on_every_route_that_reads_one(
    served: Served, clean_db: str
) -> None:
    # Too costly to draw in every batch: one body past the cap per route and method.
    start = served.log.stat().st_size
    _seed(served)
    big = b'{"user_id": "big", "messages": [{"content": "' + b"x" * MAX_BODY_BYTES + b'"}]}'
    sent = 0
    for endpoint in ENDPOINTS:
        for method in set(endpoint.methods) & {"POST", "PATCH", "PUT"}:
            url = re.sub(r"{\w+(?::\w+)?}", hostile.KNOWN_SESSION, endpoint.path)
            reply = served.client.request(method, served.base_url + url, content=big)
            # Refused before routing, unserved routes too, with nothing read past the cap.
            assert reply.status_code == 413, (method, url, reply.text[:300])
            assert reply.json()["reason"] == "REQUEST_TOO_LARGE"
            sent += 1
    assert sent >= 10
    check_consistent(clean_db)
    with psycopg.connect(clean_db) as conn:
        row = conn.execute("SELECT count(*) FROM messages").fetchone()
    assert row == (SEEDED_MESSAGES,)
    _check_log(served, start)


def test_every_registered_route_is_fuzzed() -> None:
    # The routes come from the app itself: a route added to v1, v2 or unserved is fuzzed.
    paths = {e.path for e in ENDPOINTS}
    assert {"/healthz", "/api/v1/sessions/{session_id}/memory", "/api/v2/sessions/search"} <= paths
    assert len(ENDPOINTS) == 1 + len(rest_routes())
    assert all(e.methods for e in ENDPOINTS)


def _record(endpoint: Endpoint, sender: Sender) -> None:
    TOTALS[endpoint.path] = sum(sender.statuses.values())
    record("fuzz_rest", requests=sum(TOTALS.values()), routes=len(TOTALS))


TOTALS: Counter[str] = Counter()
