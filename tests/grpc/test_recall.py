"""User-level memory in GetMemory: the user's other sessions, relevant to this one."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from memstore.v1 import resources_pb2 as rs
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from server.domain import DEFAULT_PROJECT_ID as P
from server.search.embedding import Embedder
from server.search.service import RECALL_WINDOW
from server.store import Store
from server.store.queries import query
from server.store.recall import RECALL_WORDS
from tests.grpc import Code, Sessions, Users, msg, rpc_error

pytestmark = pytest.mark.integration


async def _say(sessions: Sessions, session_id: str, user_id: str, *lines: str) -> None:
    await sessions.AddMemory(
        ss.AddMemoryRequest(
            session_id=session_id,
            user_id=user_id,
            messages=[msg(line, role=user_id, role_type=rs.ROLE_TYPE_USER) for line in lines],
        )
    )


async def _history(users: Users, sessions: Sessions) -> None:
    """Maya's earlier sessions (one about her dog, one about work) and another user's."""
    for user_id in ("maya", "leo"):
        await users.CreateUser(us.CreateUserRequest(user_id=user_id))
    await _say(
        sessions,
        "maya-pets",
        "maya",
        "We adopted a beagle named Biscuit from the shelter",
        "Biscuit is allergic to chicken so his dog food is salmon based",
    )
    await _say(sessions, "maya-work", "maya", "My quarterly report for the bank is due Friday")
    await _say(sessions, "leo-pets", "leo", "My dog Rex loves chicken treats")


async def test_recall_brings_the_users_other_sessions_relevant_to_this_one(
    users, sessions, store, embed
):
    await _history(users, sessions)
    await _say(sessions, "maya-now", "maya", "Which dog food should I buy for Biscuit?")
    await embed()
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="maya-now", relevant_limit=2))
    assert [m.content for m in memory.messages] == ["Which dog food should I buy for Biscuit?"]
    recalled = [r.message.content for r in memory.relevant_messages]
    assert recalled and len(recalled) <= 2
    assert "Biscuit is allergic to chicken so his dog food is salmon based" in recalled
    # Only Maya's other sessions: never this session's messages, never Leo's.
    assert {r.session_id for r in memory.relevant_messages} <= {"maya-pets", "maya-work"}
    assert all(r.user_id == "maya" for r in memory.relevant_messages)
    # The context block names the speaker and the date of each memory.
    assert "maya: Biscuit is allergic to chicken" in memory.context
    day = memory.relevant_messages[0].message.created_at.ToDatetime().strftime("%Y-%m-%d")
    assert day in memory.context
    if store.vectors:
        # Meaning alone finds the pet session for a question sharing no word with it.
        await _say(sessions, "maya-later", "maya", "What does my puppy like to eat?")
        await embed()
        later = await sessions.GetMemory(
            ss.GetMemoryRequest(session_id="maya-later", relevant_limit=3)
        )
        ranked = [r.session_id for r in later.relevant_messages]
        assert "maya-pets" in ranked and ranked[0] != "maya-work"


async def test_recall_matches_what_the_window_says_not_who_says_it(users, sessions, embed):
    # Recall's query is the window's content: with its speakers' names in it, every message
    # the user ever said matched "cy" at weight A, and by words a short "ok thanks" outranked
    # the assistant's answer about the dog food (make eval's recall, docs/search.md).
    await users.CreateUser(us.CreateUserRequest(user_id="cy"))
    await _say(sessions, "cy-chat", "cy", "ok thanks", "sure", "see you")
    await sessions.AddMemory(
        ss.AddMemoryRequest(
            session_id="cy-vet",
            user_id="cy",
            messages=[
                msg("what did the vet say?", role="cy", role_type=rs.ROLE_TYPE_USER),
                msg(
                    "The vet said Biscuit needs a salmon based dog food from now on",
                    role="assistant",
                    role_type=rs.ROLE_TYPE_ASSISTANT,
                ),
            ],
        )
    )
    await _say(sessions, "cy-now", "cy", "Which dog food should Biscuit get?")
    await embed()
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="cy-now", relevant_limit=3))
    recalled = [r.message.content for r in memory.relevant_messages]
    assert recalled[0] == "The vet said Biscuit needs a salmon based dog food from now on"


@pytest.mark.parametrize("question_first", [False, True], ids=["talk_first", "question_first"])
async def test_recall_finds_the_question_wherever_it_stands_in_the_window(
    users, sessions, store, embed, question_first
):
    # A question about Maya's dog and five messages of talk about music, which her history
    # does not hold: no word of the window is in her earlier sessions, so only the window's
    # vectors rank them, each of her messages by the nearest of them (recall_distance_window).
    # As the plain mean of the six, one vector pointed at the talk (make eval's recall after
    # other talk: 0.103 of recall@10); weighted to the latest, the talk outvoted a question
    # asked first (0.023) and recall went to the work session (0.554 both now;
    # docs/search.md, Recall quality).
    await _history(users, sessions)
    talk = [
        "I have been learning piano",
        "the concert last night was amazing",
        "my favourite band released an album",
        "I practise scales every morning",
        "the orchestra played Beethoven",
    ]
    question = "What does my puppy like to eat?"
    window = [question, *talk] if question_first else [*talk, question]
    await _say(sessions, "maya-now", "maya", *window)
    await embed()
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="maya-now", relevant_limit=1))
    ranked = [r.session_id for r in memory.relevant_messages]
    # Without pgvector recall ranks by words, and no word of the window is in the history.
    assert ranked == (["maya-pets"] if store.vectors else [])


@pytest.mark.parametrize("question_first", [False, True], ids=["talk_first", "question_first"])
async def test_recall_finds_the_question_after_talk_the_history_holds(
    users, sessions, store, embed, question_first
):
    # Five lines about Maya's work, word for word as an earlier session of hers holds them,
    # and a question about her dog. By the nearest of the window's vectors alone, each line's
    # copy (distance 0) and the work session's other lines outranked the dog's: every one of
    # the six recalled was about work. Now no window message's nearest memory counts as
    # nearer than RECALL_NEAREST_FLOOR, and the question's memory ranks with the copies
    # (make eval's history-talk windows: recall@10 0.263 -> 0.491; docs/search.md).
    await _history(users, sessions)
    work = [
        "The bank moved the quarterly report deadline to Thursday",
        "I have to present the quarterly numbers to the risk committee",
        "My manager wants the loan default figures broken down by region",
        "The risk committee meets every second Tuesday at the bank",
        "I stayed late at the office finishing the quarterly slides",
        "The bank is hiring two more analysts for my team next quarter",
        "My manager approved my time off after the quarterly report",
    ]
    await _say(sessions, "maya-job", "maya", *work)
    talk = work[:5]
    question = "What does my puppy like to eat?"
    window = [question, *talk] if question_first else [*talk, question]
    await _say(sessions, "maya-now", "maya", *window)
    await embed()
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="maya-now", relevant_limit=6))
    ranked = [r.session_id for r in memory.relevant_messages]
    if store.vectors:
        assert "maya-pets" in ranked, ranked
    else:
        # By words, only the work lines match: the question shares no word with the dog's.
        assert "maya-pets" not in ranked


async def test_recall_defaults_to_five_and_zero_turns_it_off(users, sessions, embed):
    await users.CreateUser(us.CreateUserRequest(user_id="kim"))
    for i in range(8):
        await _say(sessions, f"old{i}", "kim", f"kim's garden tomatoes batch {i} are ripe")
    await _say(sessions, "now", "kim", "how are my garden tomatoes doing?")
    await embed()
    default = await sessions.GetMemory(ss.GetMemoryRequest(session_id="now"))
    assert len(default.relevant_messages) == 5
    assert all(r.session_id != "now" for r in default.relevant_messages)
    none = await sessions.GetMemory(ss.GetMemoryRequest(session_id="now", relevant_limit=0))
    assert list(none.relevant_messages) == [] and none.context == ""
    assert [m.content for m in none.messages] == ["how are my garden tomatoes doing?"]


async def test_no_user_no_recall_and_deleted_sessions_are_not_recalled(users, sessions, embed):
    await users.CreateUser(us.CreateUserRequest(user_id="ola"))
    await _say(sessions, "ola-old", "ola", "I am learning to play the cello")
    await _say(sessions, "ola-gone", "ola", "cello lessons are on Tuesdays")
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="ola-gone"))
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="anon", messages=[msg("cello practice tips?")])
    )
    await _say(sessions, "ola-now", "ola", "any tips for cello practice?")
    await embed()
    anonymous = await sessions.GetMemory(ss.GetMemoryRequest(session_id="anon"))
    assert anonymous.found and list(anonymous.relevant_messages) == []
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="ola-now"))
    assert [r.session_id for r in memory.relevant_messages] == ["ola-old"]
    missing = await sessions.GetMemory(ss.GetMemoryRequest(session_id="nosuch"))
    assert not missing.found and list(missing.relevant_messages) == []


@pytest.mark.parametrize("value", [-1, 101])
async def test_relevant_limit_out_of_range_is_invalid(sessions, value):
    await rpc_error(
        sessions.GetMemory(ss.GetMemoryRequest(session_id="s", relevant_limit=value)),
        Code.INVALID_ARGUMENT,
        field="relevant_limit",
    )


async def test_kept_recall_drops_what_was_deleted_since(users, sessions, store, embed, clean_db):
    await users.CreateUser(us.CreateUserRequest(user_id="ivo"))
    await _say(sessions, "ivo-a", "ivo", "my sourdough starter is called Bubbles")
    await _say(sessions, "ivo-b", "ivo", "the sourdough loaf came out flat")
    await _say(sessions, "ivo-now", "ivo", "how do I feed a sourdough starter?")
    await embed()  # the worker ranks and keeps ivo-now's recall (where vectors are kept)
    before = await sessions.GetMemory(ss.GetMemoryRequest(session_id="ivo-now"))
    assert {r.session_id for r in before.relevant_messages} == {"ivo-a", "ivo-b"}
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="ivo-a"))
    await sessions.ClearMemory(ss.ClearMemoryRequest(session_id="ivo-b"))
    after = await sessions.GetMemory(ss.GetMemoryRequest(session_id="ivo-now"))
    assert list(after.relevant_messages) == [] and after.context == ""
    # What GetMemory read was the kept ranking (by the worker: of vectors, or of words without
    # pgvector), which still names both sessions.
    assert set(await _kept_sessions(clean_db, store, "ivo-now")) == {"ivo-a", "ivo-b"}
    # A hard delete takes the kept recall with its session (DeleteUser: the foreign key).
    await users.DeleteUser(us.DeleteUserRequest(user_id="ivo"))
    assert await _kept_sessions(clean_db, store, "ivo-now") is None


async def test_a_cleared_session_is_served_no_recall_its_old_messages_picked(
    users, sessions, store, embed, clean_db
):
    # The worker keeps a session's recall by its messages; ClearMemory then took them, and
    # GetMemory still answered memories (and a context) picked by the conversation the
    # user had cleared, while the request path (past 20 memories) answered none.
    await users.CreateUser(us.CreateUserRequest(user_id="lea"))
    await _say(sessions, "lea-a", "lea", "my sourdough starter is called Bubbles")
    await _say(sessions, "lea-now", "lea", "how do I feed a sourdough starter?")
    await embed()
    before = await sessions.GetMemory(ss.GetMemoryRequest(session_id="lea-now"))
    assert {r.session_id for r in before.relevant_messages} == {"lea-a"}
    await sessions.ClearMemory(ss.ClearMemoryRequest(session_id="lea-now"))
    assert await _kept_sessions(clean_db, store, "lea-now") is None
    for limit in (5, 21):  # kept, and ranked at the call
        after = await sessions.GetMemory(
            ss.GetMemoryRequest(session_id="lea-now", relevant_limit=limit)
        )
        assert list(after.relevant_messages) == [] and after.context == "", limit


@pytest.mark.parametrize("ended", ["cleared", "deleted"])
async def test_the_next_message_after_a_clear_is_not_served_the_old_talks_recall(  # noqa: PLR0917 (fixtures)
    users, sessions, store, embed, clean_db, ended
):
    # The recall kept for the cleared (or deleted) talk stayed: the first message after it
    # made message_count 1 again, and GetMemory served the old list, picked by what the user
    # had cleared, until the worker ranked again (an audit, 2026-12-03).
    await users.CreateUser(us.CreateUserRequest(user_id="lea"))
    await _say(sessions, "lea-bread", "lea", "my sourdough starter is called Bubbles")
    await _say(sessions, "lea-car", "lea", "my car needs new winter tires before the snow")
    await _say(sessions, "lea-now", "lea", "how do I feed my sourdough starter Bubbles?")
    await embed()
    before = await sessions.GetMemory(ss.GetMemoryRequest(session_id="lea-now"))
    assert before.relevant_messages[0].session_id == "lea-bread"
    if ended == "cleared":
        await sessions.ClearMemory(ss.ClearMemoryRequest(session_id="lea-now"))
    else:
        await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="lea-now"))
    assert await _kept_sessions(clean_db, store, "lea-now") is None
    await _say(sessions, "lea-now", "lea", "which winter tires are best in the snow?")
    after = await sessions.GetMemory(ss.GetMemoryRequest(session_id="lea-now"))
    assert after.relevant_messages[0].session_id == "lea-car"


async def test_a_session_id_the_purge_freed_and_made_again_does_not_inherit_kept_recall(
    users, sessions, store, embed, clean_db
):
    # Kept recall names memories by (session, sequence). The purge hard-deleted a session,
    # its user made one again under the same id, numbered from 1 again: the key kept for
    # "my dog Biscuit" named the new first message, and GetMemory served "my bank PIN" as
    # the top memory, until the session got a message of its own (an audit, 2026-12-03).
    await users.CreateUser(us.CreateUserRequest(user_id="pia"))
    await _say(sessions, "pia-dog", "pia", "My dog Biscuit is a beagle who loves long walks")
    await _say(sessions, "pia-cat", "pia", "The neighbour's cat chases my dog Biscuit around")
    await _say(sessions, "pia-now", "pia", "tell me about my dog Biscuit the beagle")
    await embed()
    before = await sessions.GetMemory(ss.GetMemoryRequest(session_id="pia-now"))
    assert before.relevant_messages[0].session_id == "pia-dog"
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="pia-dog"))
    assert (await store.purge(timedelta(0))).sessions == 1
    await _say(sessions, "pia-dog", "pia", "My bank PIN is 4921, do not tell anyone")
    assert (await _kept_sessions(clean_db, store, "pia-now") or [])[0] == "pia-dog"  # kept
    after = await sessions.GetMemory(ss.GetMemoryRequest(session_id="pia-now"))
    # Ranked at the call by what each memory says: the cat's, not the PIN under the dog's key.
    assert after.relevant_messages[0].session_id == "pia-cat"
    pin = [r for r in after.relevant_messages if "PIN" in r.message.content]
    assert all(r.score < after.relevant_messages[0].score for r in pin)


async def test_kept_recall_none_of_which_is_live_ranks_at_the_call(
    users, sessions, store, embed, clean_db
):
    # The worker kept mia-now's recall when only mia-a spoke of sourdough; mia-b spoke of it
    # after. With mia-a deleted none of the kept memories is live: GetMemory answered no
    # memory at all while mia-b's lives (the same call past 20 memories, ranked at the call,
    # found it). It ranks at the call now, as if nothing were kept.
    await users.CreateUser(us.CreateUserRequest(user_id="mia"))
    await _say(sessions, "mia-a", "mia", "my sourdough starter is called Bubbles")
    await _say(sessions, "mia-now", "mia", "how do I feed a sourdough starter?")
    await embed()
    assert set(await _kept_sessions(clean_db, store, "mia-now") or []) == {"mia-a"}
    await _say(sessions, "mia-b", "mia", "the sourdough loaf came out flat")
    await embed()  # keeps mia-b's own recall; mia-now's stays as it was
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="mia-a"))
    got = await sessions.GetMemory(ss.GetMemoryRequest(session_id="mia-now"))
    assert {r.session_id for r in got.relevant_messages} == {"mia-b"}
    assert "loaf" in got.context


async def test_kept_recall_short_of_its_memories_since_deleted_ranks_at_the_call(
    users, sessions, store, embed, clean_db
):
    # As above, with one of two kept memories still live: GetMemory answered that one alone
    # while mia-b's, said since, would fill the list (the same call past 20 memories found
    # both). Fewer live than the relevant_limit, of more kept, rank at the call too.
    await users.CreateUser(us.CreateUserRequest(user_id="mia"))
    await _say(sessions, "mia-a", "mia", "my sourdough starter is called Bubbles")
    await _say(sessions, "mia-c", "mia", "sourdough starter smells of vinegar again")
    await _say(sessions, "mia-now", "mia", "how do I feed a sourdough starter?")
    await embed()
    assert set(await _kept_sessions(clean_db, store, "mia-now") or []) == {"mia-a", "mia-c"}
    await _say(sessions, "mia-b", "mia", "the sourdough loaf came out flat")
    await embed()  # keeps mia-b's own recall; mia-now's stays as it was
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="mia-a"))
    got = await sessions.GetMemory(ss.GetMemoryRequest(session_id="mia-now"))
    assert {r.session_id for r in got.relevant_messages} == {"mia-b", "mia-c"}
    # Kept memories all live still answer as kept: a relevant_limit of 1 reads mia-c's alone.
    one = await sessions.GetMemory(ss.GetMemoryRequest(session_id="mia-now", relevant_limit=1))
    assert [r.session_id for r in one.relevant_messages] == ["mia-c"]


async def _kept_sessions(url: str, store: Store, session_id: str) -> list[str] | None:
    """The sessions of a session's kept recall, best first; None when nothing is kept."""
    table = "session_embeddings" if store.vectors else "session_word_recall"
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            sql.SQL("SELECT recall_sessions FROM {} WHERE session_id = %s").format(
                sql.Identifier(table)
            ),
            [session_id],
        )
        row = await cur.fetchone()
    return None if row is None or row[0] is None else list(row[0])


def _keys(found: Iterable[Any]) -> list[tuple[str, int]]:
    # Proto results (GetMemory's) carry the session beside the message, the store's inside.
    return [
        (getattr(r, "session_id", None) or r.message.session_id, r.message.sequence) for r in found
    ]


async def _request_path(store: Store, embedder: Embedder, session_id: str, limit: int) -> Any:
    """What GetMemory ranks on the request path when nothing is kept for the session."""
    return await store.rank_recall(
        P,
        session_id,
        limit=limit,
        window=RECALL_WINDOW,
        model=embedder.name if store.vectors else None,
    )


async def test_kept_recall_is_what_the_request_path_ranks(
    users, sessions, store, embed, *, embedder, clean_db
):
    # The worker keeps each session's recall as GetMemory would rank it on the request path
    # (with pgvector: words and the recall vector; without: words alone), so reading the
    # kept one changes no answer, only where the work is done.
    await _history(users, sessions)
    await _say(sessions, "maya-now", "maya", "Which dog food should I buy for Biscuit?")
    await _say(sessions, "maya-bank", "maya", "the bank wants the quarterly report Friday")
    await embed()
    for session_id in ("maya-pets", "maya-work", "maya-now", "maya-bank"):
        kept = await _kept_sessions(clean_db, store, session_id)
        assert kept, f"{session_id}: no recall kept"
        memory = await sessions.GetMemory(
            ss.GetMemoryRequest(session_id=session_id, relevant_limit=10)
        )
        ranked = await _request_path(store, embedder, session_id, 10)
        assert _keys(memory.relevant_messages) == _keys(ranked), session_id
        assert [r.score for r in memory.relevant_messages] == pytest.approx(
            [r.score for r in ranked]
        )
        assert {s for s, _ in _keys(ranked)} <= {"maya-pets", "maya-work", "maya-now", "maya-bank"}


async def test_a_session_is_kept_again_after_new_messages(
    users, sessions, store, embed, *, embedder, clean_db
):
    await users.CreateUser(us.CreateUserRequest(user_id="eli"))
    await _say(sessions, "eli-bees", "eli", "the bees made honey this summer")
    await _say(sessions, "eli-bread", "eli", "my sourdough starter needs feeding twice a day")
    await _say(sessions, "eli-now", "eli", "how is the honey from the bees?")
    await embed()
    first = await sessions.GetMemory(ss.GetMemoryRequest(session_id="eli-now", relevant_limit=1))
    assert [r.session_id for r in first.relevant_messages] == ["eli-bees"]
    await _say(
        sessions,
        "eli-now",
        "eli",
        "forget the bees",
        "how often should I feed my sourdough starter?",
        "sourdough starter feeding schedule",
    )
    # Until the worker has seen the new messages, GetMemory reads what it kept before.
    stale = await sessions.GetMemory(ss.GetMemoryRequest(session_id="eli-now", relevant_limit=1))
    assert [r.session_id for r in stale.relevant_messages] == ["eli-bees"]
    await embed()
    assert (await _kept_sessions(clean_db, store, "eli-now") or [])[0] == "eli-bread"
    now = await sessions.GetMemory(ss.GetMemoryRequest(session_id="eli-now", relevant_limit=2))
    assert now.relevant_messages[0].session_id == "eli-bread"
    ranked = await _request_path(store, embedder, "eli-now", 2)
    assert _keys(now.relevant_messages) == _keys(ranked)


async def test_a_session_not_yet_kept_is_ranked_on_the_request_path(users, sessions, embed):
    # Messages the worker has not reached: GetMemory ranks their recall itself.
    await users.CreateUser(us.CreateUserRequest(user_id="fay"))
    await _say(sessions, "fay-old", "fay", "my violin needs new strings")
    await embed()
    await _say(sessions, "fay-now", "fay", "which violin strings should I buy?")
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="fay-now"))
    assert [r.session_id for r in memory.relevant_messages] == ["fay-old"]


async def test_kept_recall_fills_the_limit_past_deleted_memories(users, sessions, embed):
    # The kept ranking is cut to relevant_limit live memories in SQL: deleting the best ones
    # brings the next ones in, never fewer than asked while the kept list holds enough.
    await users.CreateUser(us.CreateUserRequest(user_id="uma"))
    for i in range(8):
        await _say(sessions, f"uma{i}", "uma", f"uma's bread baking attempt {i} with rye flour")
    await _say(sessions, "uma-now", "uma", "tips for baking rye bread?")
    await embed()
    first = await sessions.GetMemory(ss.GetMemoryRequest(session_id="uma-now", relevant_limit=3))
    best = [r.session_id for r in first.relevant_messages]
    assert len(best) == 3
    for session_id in best:
        await sessions.DeleteSession(ss.DeleteSessionRequest(session_id=session_id))
    then = await sessions.GetMemory(ss.GetMemoryRequest(session_id="uma-now", relevant_limit=3))
    later = [r.session_id for r in then.relevant_messages]
    assert len(later) == 3 and not set(later) & set(best)
    assert then.context.count("\n- (") == 3  # one line per memory after the header


async def test_concurrent_get_memory_calls_each_get_their_own_answer(users, sessions, embed):
    # Concurrent calls share one statement: each must still get its own session, window and
    # recall, with its own lastn and relevant_limit, as it would alone.
    await users.CreateUser(us.CreateUserRequest(user_id="rae"))
    for i in range(6):
        await _say(sessions, f"rae{i}", "rae", f"rae's pottery class {i} glazes", f"kiln {i} fired")
    await embed()
    asks = [
        ss.GetMemoryRequest(session_id=f"rae{i}", lastn=1 + i % 2, relevant_limit=i % 4)
        for i in range(6)
    ] + [ss.GetMemoryRequest(session_id="nobody")]
    alone = [await sessions.GetMemory(a) for a in asks]
    together = await asyncio.gather(*(sessions.GetMemory(a) for a in asks))
    for ask, one, many in zip(asks, alone, together, strict=True):
        assert many == one, ask
    assert [len(m.messages) for m in together[:6]] == [1, 2, 1, 2, 1, 2]
    assert [len(m.relevant_messages) for m in together[:6]] == [0, 1, 2, 3, 0, 1]
    assert not together[6].found


async def test_recall_matches_the_windows_most_repeated_words_at_most_recall_words(
    users, sessions, embed, clean_db
):
    # Matching and ranking each of the user's messages costs with the query's size: recall
    # keeps RECALL_WORDS words of the window, those it repeats first (its topic).
    await users.CreateUser(us.CreateUserRequest(user_id="noa"))
    await _say(sessions, "noa-dog", "noa", "Biscuit chewed the sofa again")
    # 84 words said once each, and Biscuit three times.
    filler = [f"{word}{n}" for n in range(21) for word in ("alpha", "bravo", "delta", "kilo")]
    lines = [
        " ".join(filler[i * 14 : i * 14 + 14]) + (" Biscuit" if i % 2 else "") for i in range(6)
    ]
    await _say(sessions, "noa-now", "noa", *lines)
    await embed()
    params = {"project_id": 1, "exclude_session": "noa-now", "window": 6, "words": RECALL_WORDS}
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute(query("recall_query_text"), params)
        row = await cur.fetchone()
    assert row is not None
    words = set(re.findall(r"'([^']+)'", str(row[0])))
    assert len(words) == RECALL_WORDS and "biscuit" in words and "noa" not in words, words
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="noa-now"))
    assert [r.session_id for r in memory.relevant_messages] == ["noa-dog"]
