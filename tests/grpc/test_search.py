"""SearchMemory over a real channel with the real embedding model and worker.

Each test asserts the behaviour of the database it runs on: with pgvector (the embedded
PostgreSQL) search ranks by meaning too; without it (CI's external PostgreSQL 15) the same
calls serve full-text results and say why semantic ranking is missing.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2

from memstore.v1 import resources_pb2 as rs
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import session_service_pb2_grpc
from memstore.v1 import user_service_pb2 as us
from server.config import Config
from server.domain import DEFAULT_PROJECT_ID
from server.search.embedding import Embedder
from server.search.service import RECALL_WINDOW
from server.serving.app import build_server
from server.store import Store
from server.store.search import SEARCH_WORDS
from tests.fake_embedder import serving
from tests.grpc import Code, Sessions, Users, as_dict, msg, rpc_error, struct

pytestmark = pytest.mark.integration

HYBRID, FULL_TEXT, SEMANTIC = (
    ss.SEARCH_TYPE_HYBRID,
    ss.SEARCH_TYPE_FULL_TEXT,
    ss.SEARCH_TYPE_SEMANTIC,
)


async def _conversation(
    users: Users, sessions: Sessions, user_id: str, session_id: str, *lines: tuple[str, str]
) -> ss.AddMemoryResponse:
    """Adds (role, content) lines to a session of `user_id` (created when missing)."""
    try:
        await users.CreateUser(us.CreateUserRequest(user_id=user_id))
    except Exception as exc:
        if "ALREADY_EXISTS" not in str(exc):
            raise
    return await sessions.AddMemory(
        ss.AddMemoryRequest(
            session_id=session_id,
            user_id=user_id,
            messages=[
                msg(
                    content,
                    role=role,
                    role_type=rs.ROLE_TYPE_ASSISTANT if role == "assistant" else rs.ROLE_TYPE_USER,
                )
                for role, content in lines
            ],
        )
    )


async def _search(sessions: Sessions, text: str, **kw: object) -> ss.SearchMemoryResponse:
    return await sessions.SearchMemory(ss.SearchMemoryRequest(text=text, **kw))  # type: ignore[arg-type]


def _contents(response: ss.SearchMemoryResponse) -> list[str]:
    return [r.message.content for r in response.results]


async def test_full_text_finds_a_message_as_soon_as_add_memory_returns(users, sessions, store):
    added = await _conversation(
        users,
        sessions,
        "ana",
        "trip",
        ("ana", "My flight to Lisbon is TP1357 on the 14th"),
        ("assistant", "Noted, have a good trip"),
    )
    found = await _search(sessions, "TP1357", user_id="ana", search_type=FULL_TEXT)
    assert _contents(found) == ["My flight to Lisbon is TP1357 on the 14th"]
    result = found.results[0]
    assert result.session_id == "trip" and result.user_id == "ana" and result.score > 0
    assert result.message.uuid == added.messages[0].uuid
    assert result.message.role == "ana" and result.message.sequence == 1
    assert not found.semantic
    # The hybrid default finds it too, embedded or not yet.
    hybrid = await _search(sessions, "TP1357", user_id="ana")
    assert _contents(hybrid)[0] == "My flight to Lisbon is TP1357 on the 14th"
    if store.vectors:
        assert hybrid.semantic and hybrid.unembedded_messages == 2
    else:
        assert not hybrid.semantic and "pgvector" in hybrid.note


async def test_results_carry_metadata_and_the_speaker_counts(users, sessions):
    await users.CreateUser(us.CreateUserRequest(user_id="u"))
    await sessions.AddMemory(
        ss.AddMemoryRequest(
            session_id="s",
            user_id="u",
            messages=[
                msg("shall we meet on friday?", role="Priya", metadata=struct({"lang": "en"})),
                msg("the weather is nice", role="Tom"),
            ],
        )
    )
    found = await _search(sessions, "what did Priya say", search_type=FULL_TEXT)
    assert _contents(found) == ["shall we meet on friday?"]
    assert as_dict(found.results[0].message.metadata) == {"lang": "en"}


async def test_semantic_search_finds_a_paraphrase_once_embedded(users, sessions, store, embed):
    await _conversation(
        users,
        sessions,
        "bo",
        "pets",
        ("bo", "We adopted a beagle puppy last week and named him Biscuit"),
        ("bo", "The quarterly tax filing is due in April"),
        ("bo", "I prefer window seats on long flights"),
    )
    request = ss.SearchMemoryRequest(text="what is my dog called?", user_id="bo", limit=1)
    if not store.vectors:
        error = await rpc_error(
            sessions.SearchMemory(
                ss.SearchMemoryRequest(text="dog", user_id="bo", search_type=SEMANTIC)
            ),
            Code.FAILED_PRECONDITION,
            reason="SEMANTIC_UNAVAILABLE",
        )
        assert "pgvector" in (error.details() or "")
        return
    before = await _search(sessions, "what is my dog called?", user_id="bo", search_type=SEMANTIC)
    assert before.results == [] and before.unembedded_messages == 3
    assert await embed() == 3
    request.search_type = SEMANTIC
    after = await sessions.SearchMemory(request)
    assert _contents(after) == ["We adopted a beagle puppy last week and named him Biscuit"]
    assert after.semantic and after.unembedded_messages == 0
    assert 0 < after.results[0].score <= 1
    # Hybrid finds it too, though no word of the question is in it.
    request.search_type = HYBRID
    hybrid = await sessions.SearchMemory(request)
    assert _contents(hybrid) == _contents(after)


async def test_scopes_user_sessions_and_project(users, sessions, embed):
    await _conversation(users, sessions, "a", "a1", ("a", "my locker code is 4521"))
    await _conversation(users, sessions, "a", "a2", ("a", "locker room renovation next week"))
    await _conversation(users, sessions, "b", "b1", ("b", "the gym locker broke"))
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="anon", messages=[msg("lost my locker key")])
    )
    await embed()

    def sessions_of(response: ss.SearchMemoryResponse) -> set[str]:
        return {r.session_id for r in response.results}

    assert sessions_of(await _search(sessions, "locker", user_id="a")) == {"a1", "a2"}
    assert sessions_of(await _search(sessions, "locker", session_ids=["a2", "b1"])) == {
        "a2",
        "b1",
    }
    assert sessions_of(await _search(sessions, "locker")) == {"a1", "a2", "b1", "anon"}
    assert (await _search(sessions, "locker", user_id="nobody")).results == []
    assert (await _search(sessions, "locker", session_ids=["nosuch"])).results == []
    limited = await _search(sessions, "locker", limit=2)
    assert len(limited.results) == 2


async def test_deleted_and_cleared_messages_never_appear(users, sessions, embed):
    await _conversation(users, sessions, "c", "kept", ("c", "zebra crossing near the school"))
    await _conversation(users, sessions, "c", "gone", ("c", "zebra stripes are unique"))
    await _conversation(users, sessions, "c", "wiped", ("c", "zebra documentary tonight"))
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="gone"))
    await sessions.ClearMemory(ss.ClearMemoryRequest(session_id="wiped"))
    for _ in range(2):  # before the worker ran, and after
        for search_type in (HYBRID, FULL_TEXT):
            found = await _search(sessions, "zebra", search_type=search_type)
            assert _contents(found) == ["zebra crossing near the school"]
        await embed()
    # Restoring a session does not restore its deleted messages.
    await sessions.UndeleteSession(ss.UndeleteSessionRequest(session_id="gone"))
    assert _contents(await _search(sessions, "zebra")) == ["zebra crossing near the school"]


async def test_filters_role_types_metadata_and_time(users, sessions):
    await users.CreateUser(us.CreateUserRequest(user_id="d"))
    added = await sessions.AddMemory(
        ss.AddMemoryRequest(
            session_id="f",
            user_id="d",
            messages=[
                msg("pasta recipe from grandma", role_type=rs.ROLE_TYPE_USER),
                msg(
                    "a pasta recipe with basil",
                    role_type=rs.ROLE_TYPE_ASSISTANT,
                    metadata=struct({"source": "web", "tags": ["food"]}),
                ),
            ],
        )
    )
    only_assistant = await _search(sessions, "pasta", role_types=[rs.ROLE_TYPE_ASSISTANT])
    assert _contents(only_assistant) == ["a pasta recipe with basil"]
    tagged = await _search(sessions, "pasta", metadata_contains=struct({"source": "web"}))
    assert _contents(tagged) == ["a pasta recipe with basil"]
    created = added.messages[0].created_at.ToDatetime(tzinfo=UTC)
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(created + timedelta(hours=1))
    earlier = timestamp_pb2.Timestamp()
    earlier.FromDatetime(created - timedelta(hours=1))
    assert len((await _search(sessions, "pasta", created_after=earlier)).results) == 2
    assert (await _search(sessions, "pasta", created_after=later)).results == []
    assert (await _search(sessions, "pasta", created_before=earlier)).results == []


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"text": ""}, "text"),
        ({"text": "   "}, "text"),
        ({"text": "x" * 10_001}, "text"),
        ({"text": "a", "user_id": "u", "session_ids": ["s"]}, "session_ids"),
        ({"text": "a", "limit": 101}, "limit"),
        ({"text": "a", "limit": -1}, "limit"),
        ({"text": "a", "search_type": 9}, "search_type"),
        ({"text": "a", "mmr_lambda": 1.5}, "mmr_lambda"),
        ({"text": "a", "mmr_lambda": 0.5, "search_type": FULL_TEXT}, "mmr_lambda"),
        ({"text": "a", "role_types": [42]}, "role_types[0]"),
        ({"text": "a", "session_ids": ["ok", ""]}, "session_ids[1]"),
        ({"text": "a", "session_ids": [f"s{i}" for i in range(101)]}, "session_ids"),
        ({"text": "a\x00b"}, "text"),
    ],
)
async def test_bad_search_requests_name_the_field(sessions, request_fields, field):
    await rpc_error(
        sessions.SearchMemory(ss.SearchMemoryRequest(**request_fields)),
        Code.INVALID_ARGUMENT,
        field=field,
    )


async def test_a_search_over_100_sessions_is_served(sessions):
    # At the limit of session_ids (one past it is refused, above): none of them exists.
    found = await sessions.SearchMemory(
        ss.SearchMemoryRequest(text="pasta", session_ids=[f"s{i}" for i in range(100)])
    )
    assert list(found.results) == []


async def test_time_range_must_be_ordered(sessions):
    now = timestamp_pb2.Timestamp()
    now.FromDatetime(datetime.now(UTC))
    await rpc_error(
        sessions.SearchMemory(
            ss.SearchMemoryRequest(text="a", created_after=now, created_before=now)
        ),
        Code.INVALID_ARGUMENT,
        field="created_before",
    )


async def test_mmr_trades_relevance_for_diversity(users, sessions, store, embed):
    lines = [("e", f"I love hiking in the Alps, day {i} of the trip was great") for i in range(5)]
    lines.append(("e", "Mountain biking through the Dolomites was thrilling"))
    await _conversation(users, sessions, "e", "alps", *lines)
    await embed()
    text = "hiking in the Alps"
    if not store.vectors:
        await rpc_error(
            sessions.SearchMemory(ss.SearchMemoryRequest(text=text, mmr_lambda=0.5)),
            Code.FAILED_PRECONDITION,
            reason="SEMANTIC_UNAVAILABLE",
        )
        return
    plain = await _search(sessions, text, user_id="e", search_type=SEMANTIC, limit=3)
    assert all("Alps" in c for c in _contents(plain))
    diverse = await _search(
        sessions, text, user_id="e", search_type=SEMANTIC, limit=3, mmr_lambda=0.3
    )
    assert "Mountain biking through the Dolomites was thrilling" in _contents(diverse)
    assert _contents(diverse)[0] == _contents(plain)[0]


async def test_unknown_user_and_empty_project_give_no_results(sessions):
    assert (await _search(sessions, "anything at all")).results == []
    assert (await _search(sessions, "anything", user_id="ghost")).results == []


async def test_stopwords_only_query_is_not_an_error(users, sessions):
    await _conversation(users, sessions, "g", "s", ("g", "it is what it is"))
    found = await _search(sessions, "what is it", search_type=FULL_TEXT)
    assert found.results == []


async def test_a_long_text_matches_by_its_64_longest_words(sessions):
    # Every word of a 10,000-character text was a term of the query: a posting list each, and
    # each matched message ranked against all 1,400 of them, 10.2 s for one call over 30,000
    # messages (0.36 s at 64; docs/search.md, "Long texts").
    await sessions.AddMemory(
        ss.AddMemoryRequest(
            session_id="s", messages=[msg("a hippopotamus grazes"), msg("a quokka smiles")]
        )
    )
    longer = " ".join(f"unmatched{i:02d}" for i in range(SEARCH_WORDS - 1))
    text = f"quokka hippopotamus {longer}"
    found = await sessions.SearchMemory(ss.SearchMemoryRequest(text=text, search_type=FULL_TEXT))
    # "quokka" is shorter than the 64 others and left out.
    assert [r.message.content for r in found.results] == ["a hippopotamus grazes"]
    # A text of 64 words or fewer is matched whole.
    text = f"quokka hippopotamus {' '.join(longer.split()[:62])}"
    found = await sessions.SearchMemory(ss.SearchMemoryRequest(text=text, search_type=FULL_TEXT))
    assert len(found.results) == 2
    # Words joined by underscores are words to PostgreSQL's parser, and count as such: the
    # same text with "_" for " " was one word here, and every word reached the query.
    text = text.replace(" ", "_")
    found = await sessions.SearchMemory(ss.SearchMemoryRequest(text=text, search_type=FULL_TEXT))
    assert len(found.results) == 2
    text = f"quokka_hippopotamus_{longer.replace(' ', '_')}"
    found = await sessions.SearchMemory(ss.SearchMemoryRequest(text=text, search_type=FULL_TEXT))
    assert [r.message.content for r in found.results] == ["a hippopotamus grazes"]


async def test_a_text_of_only_invisible_characters_is_no_search_text(sessions):
    # Spaces were refused, but a zero-width space or a byte order mark alone was searched for,
    # and once messages had vectors it answered arbitrary ones (an audit, 2026-12-03).
    for text in ("\u200b", "\ufeff", " \u200d\u200b ", "\u2028"):
        await rpc_error(
            sessions.SearchMemory(ss.SearchMemoryRequest(text=text)),
            Code.INVALID_ARGUMENT,
            field="text",
        )


async def test_a_failing_remote_embedder_is_unavailable_and_full_text_still_answers(
    sessions: Sessions, store: Store, clean_db: str
) -> None:
    # A remote embedder on a port nobody listens on: the query's embedding fails at once.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1/embeddings"
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("tea or coffee")]))
    config = Config(host="127.0.0.1", port=0, embedder=url, embedder_model="m")
    server, port = await build_server(config, store)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            remote = session_service_pb2_grpc.SessionServiceStub(channel)
            hybrid = remote.SearchMemory(ss.SearchMemoryRequest(text="coffee"))
            if store.vectors:
                error = await rpc_error(hybrid, Code.UNAVAILABLE, reason="EMBEDDER_UNAVAILABLE")
                assert "SEARCH_TYPE_FULL_TEXT" in (error.details() or "")
            else:  # no vectors kept: the model is never asked, words alone answer
                assert not (await hybrid).semantic
            words = await remote.SearchMemory(
                ss.SearchMemoryRequest(text="coffee", search_type=FULL_TEXT)
            )
            assert _contents(words) == ["tea or coffee"]
    finally:
        await server.stop(None)


async def test_a_text_the_remote_model_refuses_is_invalid_argument_naming_it(
    sessions: Sessions, store: Store, clean_db: str
) -> None:
    # A remote model refuses a text past its context (HTTP 400). That was UNAVAILABLE,
    # EMBEDDER_UNAVAILABLE, "retry": every retry failed alike. A model refusing even a word
    # is misconfigured, the server's fault: UNAVAILABLE still.
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("tea or coffee")]))
    with serving() as model:
        model.max_chars = 50
        config = Config(host="127.0.0.1", port=0, embedder=model.url, embedder_model="m")
        server, port = await build_server(config, store)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                remote = session_service_pb2_grpc.SessionServiceStub(channel)
                long = remote.SearchMemory(ss.SearchMemoryRequest(text="coffee " * 20))
                if not store.vectors:  # no vectors kept: the model is never asked
                    assert _contents(await long) == ["tea or coffee"]
                    assert model.requests == []
                    return
                error = await rpc_error(long, Code.INVALID_ARGUMENT, field="text")
                assert "refuses it" in (error.details() or "")
                assert "SEARCH_TYPE_FULL_TEXT" in (error.details() or "")
                short = await remote.SearchMemory(ss.SearchMemoryRequest(text="coffee"))
                assert short.semantic and _contents(short) == ["tea or coffee"]
                model.max_chars = 0
                refusing = remote.SearchMemory(ss.SearchMemoryRequest(text="coffee"))
                await rpc_error(refusing, Code.UNAVAILABLE, reason="EMBEDDER_UNAVAILABLE")
        finally:
            await server.stop(None)


async def test_until_embedded_a_message_ranks_by_its_words_at_full_weight(
    sessions: Sessions, store: Store, embed: Callable[[], Awaitable[int]]
) -> None:
    # Hybrid normalises each ranker over its own candidates, so the best vector candidate
    # scores the vector weight (0.7) however weak its similarity. A message not embedded yet
    # used to take 0 there, capped at the text weight (0.3): a new message holding the
    # query's words ranked below an older one that only resembled it ("bees honey" put "Hello
    # Priya! How are the bees?" above "They made honey.", as LangChain's Zep history test met
    # when its search ran before the worker). Now its vector part is its text part.
    older = ["Hi! I'm Priya and I keep bees.", "Hello Priya! How are the bees?"]
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="lc", messages=[msg(x) for x in older]))
    await embed()
    newer = ["They made honey.", "Sweet!"]
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="lc", messages=[msg(x) for x in newer]))
    request = ss.SearchMemoryRequest(text="bees honey", session_ids=["lc"], limit=3)
    waiting = await sessions.SearchMemory(request)
    words = set(older) | {"They made honey."}
    if not store.vectors:
        # Words alone rank every message alike, new or old: nothing waits for a worker, and
        # the response says the ranking had no meaning to add.
        assert not waiting.semantic and waiting.unembedded_messages == 0
        assert set(_contents(waiting)) == words
        return
    assert waiting.semantic and waiting.unembedded_messages == 2
    assert set(_contents(waiting)) == words
    scores = {r.message.content: r.score for r in waiting.results}
    # The shortest match has the best ts_rank: 1.0 on words, and so 1.0 in all while it
    # waits, above every embedded candidate (each at most 1.0, and below it on words).
    assert scores["They made honey."] == pytest.approx(1.0)
    assert _contents(waiting)[0] == "They made honey."
    assert all(scores[x] < 1.0 for x in older)
    await embed()
    embedded = await sessions.SearchMemory(request)
    assert embedded.unembedded_messages == 0
    assert _contents(embedded)[0] == "They made honey."


async def test_an_unembedded_exact_word_outranks_an_embedded_message_without_it(
    sessions: Sessions, store: Store, embed: Callable[[], Awaitable[int]]
) -> None:
    # The README's REST walk-through met this: "vegetarian" ranked an embedded "Hi!" (the
    # best vector candidate, 0.7) above "Hi, I am vegetarian." (words only, then 0.3).
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="veg", messages=[msg("Hi!")]))
    await embed()
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="veg", messages=[msg("Hi, I am vegetarian.")])
    )
    found = await sessions.SearchMemory(
        ss.SearchMemoryRequest(text="vegetarian", session_ids=["veg"])
    )
    assert _contents(found)[0] == "Hi, I am vegetarian."
    assert found.unembedded_messages == (1 if store.vectors else 0)


async def test_equal_scores_rank_the_newest_message_first(
    users: Users,
    sessions: Sessions,
    store: Store,
    embed: Callable[[], Awaitable[int]],
    embedder: Embedder,
) -> None:
    # Messages of one AddMemory share their created_at, so equal scores fell to the uuids:
    # random ones, so the same messages written twice ranked in another order (make eval's
    # figures moved between runs of the same code). The later message of a write comes first
    # now, as a later write's does. Here the uuids rise with the sequence: by uuid the oldest
    # came first.
    await users.CreateUser(us.CreateUserRequest(user_id="tie"))
    uuids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 5)]
    added = await sessions.AddMemory(
        ss.AddMemoryRequest(
            session_id="kites",
            user_id="tie",
            messages=[msg("the red kite flies", uuid=u) for u in uuids],
        )
    )
    newest_first = sorted((m.sequence for m in added.messages), reverse=True)
    await embed()
    types = [FULL_TEXT, HYBRID, SEMANTIC] if store.vectors else [FULL_TEXT]
    for search_type in types:
        found = await _search(sessions, "red kite", user_id="tie", search_type=search_type)
        assert [r.message.sequence for r in found.results] == newest_first, search_type
    # GetMemory's recall ranks with the same statements: by words, and by vectors.
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="now", user_id="tie", messages=[msg("a red kite")])
    )
    await embed()
    for model in [None, embedder.name] if store.vectors else [None]:
        recalled = await store.rank_recall(
            DEFAULT_PROJECT_ID, "now", limit=10, window=RECALL_WINDOW, model=model
        )
        assert [r.message.sequence for r in recalled] == newest_first, model
