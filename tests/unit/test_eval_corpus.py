"""The retrieval corpus is well formed, and its metrics, fusion and BM25 baseline are right."""

from __future__ import annotations

import io
from collections import Counter

import pytest

from bench.eval import corpus as corpus_module
from bench.eval.bm25 import BM25Ranker, tokenize
from bench.eval.chatter import ChatterGenerator
from bench.eval.corpus import KINDS, USERS, Corpus, Message, MessageKey, Question, load
from bench.eval.fusion import rrf
from bench.eval.metrics import aggregate, evaluate, recall_at, reciprocal_rank, score_question
from bench.eval.report import report


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load()


def _key(i: int) -> MessageKey:
    return MessageKey("u", "u-s01", i)


def _question(text: str, evidence: set[MessageKey], kind: str = "lexical") -> Question:
    return Question("u-q01", "u", text, kind, frozenset(evidence))  # type: ignore[arg-type]


def _find(corpus: Corpus, user_id: str, text: str) -> Question:
    return next(q for q in corpus.questions if q.user_id == user_id and q.text == text)


# --- the corpus -----------------------------------------------------------------------------


def test_every_evidence_key_exists_and_is_the_questions_users(corpus: Corpus) -> None:
    keys = {m.key for m in corpus.messages}
    for q in corpus.questions:
        assert 1 <= len(q.evidence) <= 3, q.qid
        assert q.evidence <= keys, q.qid
        assert {k.user_id for k in q.evidence} == {q.user_id}, q.qid


def test_message_keys_and_question_ids_are_unique(corpus: Corpus) -> None:
    keys = [m.key for m in corpus.messages]
    assert len(keys) == len(set(keys))
    qids = [q.qid for q in corpus.questions]
    assert len(qids) == len(set(qids))


def test_sessions_are_numbered_from_zero_and_sized_like_conversations(corpus: Corpus) -> None:
    for session_id, messages in corpus.sessions().items():
        assert [m.key.index for m in messages] == list(range(len(messages))), session_id
        assert 15 <= len(messages) <= 40, session_id
        assert len({m.key.user_id for m in messages}) == 1, session_id


def test_users_have_long_histories_and_other_speakers_appear(corpus: Corpus) -> None:
    sessions = Counter(sid.split("-")[0] for sid in corpus.sessions())
    assert set(sessions) == set(USERS)
    assert min(sessions.values()) >= 25
    assert 5_000 <= len(corpus.messages) <= 6_000
    for user_id in USERS:
        assert 900 <= len(corpus.user_messages(user_id)) <= 1_200, user_id
    roles = {m.role for m in corpus.messages if m.role_type == "user"}
    # The users themselves plus people who joined a chat, some only in the later sessions.
    assert {"Priya", "Anna", "Dan", "Jonas", "Meera", "Kim", "Luis", "Devon"} <= roles


def test_question_kinds_are_all_present_in_a_realistic_mix(corpus: Corpus) -> None:
    kinds = Counter(q.kind for q in corpus.questions)
    assert 150 <= len(corpus.questions) <= 180
    assert set(kinds) == set(KINDS)
    for kind in KINDS:
        assert kinds[kind] >= 0.15 * len(corpus.questions), kinds


def test_no_user_says_the_same_line_more_than_twice(corpus: Corpus) -> None:
    # Generated chatter and filler are drawn so that a long history does not read as a
    # loop of the same few templates.
    for user_id in USERS:
        said = Counter(m.content for m in corpus.user_messages(user_id) if m.role_type == "user")
        assert max(said.values()) <= 2, said.most_common(1)


def test_the_corpus_is_deterministic() -> None:
    # load() is cached; build it again from the files to compare two independent builds.
    assert corpus_module.load.__wrapped__() == load()


@pytest.mark.parametrize(
    ("user_id", "text", "stale"),
    [
        ("maya", "Which city do I live in now?", "Alberta Street"),
        ("maya", "Who walks the dog these days?", "Jess from Pawsome Walks"),
        ("maya", "Who looks after the dog's health since we moved?", "Dr. Okoye"),
        ("raj", "How many croissants does Northbound Coffee want a day now?", "120 croissants"),
        ("lena", "How much do I earn at my new job?", "78k"),
    ],
)
def test_a_fact_that_changed_keeps_its_old_value_as_a_distractor_not_evidence(
    corpus: Corpus, user_id: str, text: str, stale: str
) -> None:
    question = _find(corpus, user_id, text)
    old = [m.key for m in corpus.user_messages(user_id) if stale in m.content]
    assert old
    assert not question.evidence & set(old)


# --- generated chatter ----------------------------------------------------------------------


def _topic(*lines: str) -> dict[str, list[list[list[str]]]]:
    return {"templates": [[["U" if i % 2 == 0 else "A", line] for i, line in enumerate(lines)]]}


def test_fresh_identifiers_are_unique_and_never_in_the_written_text() -> None:
    spec = {"ids": {"order": "A-#"}, "topics": {"orders": _topic("order #{#order}")}}
    generator = ChatterGenerator(spec, "evidence: order #A-3, and #A-7", "test")
    drawn = [generator.exchanges(["orders"])[0][0][1] for _ in range(8)]
    assert len(set(drawn)) == 8
    assert not {"order #A-3", "order #A-7"} & set(drawn)
    with pytest.raises(ValueError, match="run out"):
        generator.exchanges(["orders"])  # ten values, two written, eight drawn


def test_slots_fill_consistently_within_an_exchange_and_the_same_seed_repeats() -> None:
    spec = {
        "slots": {"item": ["kettle", "lamp", "rug"]},
        "topics": {"home": _topic("the {item} and the {item2}", "a new {item} || one more {item}")},
    }
    exchanges = ChatterGenerator(spec, "", "seed").exchanges(["home"] * 5)
    assert exchanges == ChatterGenerator(spec, "", "seed").exchanges(["home"] * 5)
    for (_, said), (_, reply) in exchanges:
        first, second = said.removeprefix("the ").split(" and the ")
        assert first != second
        assert reply.endswith(f" {first}")


def test_a_template_naming_an_unknown_slot_fails_when_loaded() -> None:
    with pytest.raises(ValueError, match="unknown slot"):
        ChatterGenerator({"topics": {"t": _topic("the {nope}")}}, "", "seed")


# --- metrics --------------------------------------------------------------------------------


def test_recall_at_k_is_a_hit_within_the_top_k() -> None:
    ranked = [_key(9), _key(4), _key(7), _key(1), _key(2), _key(3)]
    assert recall_at(ranked, frozenset({_key(3)}), 5) == 0.0
    assert recall_at(ranked, frozenset({_key(3)}), 10) == 1.0
    assert recall_at(ranked, frozenset({_key(2), _key(8)}), 5) == 1.0
    assert recall_at([], frozenset({_key(2)}), 10) == 0.0
    with pytest.raises(ValueError):
        recall_at(ranked, frozenset(), 5)


def test_reciprocal_rank_is_of_the_first_evidence_within_depth_ten() -> None:
    ranked = [_key(i) for i in range(20)]
    assert reciprocal_rank(ranked, frozenset({_key(0)})) == 1.0
    assert reciprocal_rank(ranked, frozenset({_key(5), _key(2)})) == pytest.approx(1 / 3)
    assert reciprocal_rank(ranked, frozenset({_key(9)})) == pytest.approx(1 / 10)
    assert reciprocal_rank(ranked, frozenset({_key(10)})) == 0.0


def test_aggregate_means_match_a_hand_computation() -> None:
    a = _question("a", {_key(1)})
    b = _question("b", {_key(2), _key(3)}, "paraphrase")
    c = _question("c", {_key(4)}, "mixed")
    # a: rank 2 -> R@5 1, R@10 1, RR 1/2. b: first evidence at rank 7 -> R@5 0, R@10 1,
    # RR 1/7. c: not in the top 10 -> all 0.
    filler = [_key(i) for i in range(100, 120)]
    scores = [
        score_question(a, [_key(9), _key(1), *filler]),
        score_question(b, [*filler[:6], _key(3), _key(2)]),
        score_question(c, [*filler[:10], _key(4)]),
    ]
    total = aggregate(scores)
    assert total.questions == 3
    assert total.recall_at_5 == pytest.approx(1 / 3)
    assert total.recall_at_10 == pytest.approx(2 / 3)
    assert total.mrr == pytest.approx((1 / 2 + 1 / 7 + 0) / 3)
    assert aggregate([]).questions == 0


def test_evaluate_splits_by_kind() -> None:
    questions = [_question("a", {_key(1)}), _question("b", {_key(2)}, "paraphrase")]
    result = evaluate(lambda q: [_key(1)], questions)
    assert result.overall.recall_at_10 == 0.5
    assert result.by_kind["lexical"].mrr == 1.0
    assert result.by_kind["paraphrase"].mrr == 0.0
    assert result.by_kind["mixed"].questions == 0


def test_rrf_sums_reciprocal_ranks_with_k_60() -> None:
    x, y, z, w = _key(1), _key(2), _key(3), _key(4)
    # x: 1/61 + 1/63; y: 1/62 + 1/61; z: 1/63; w: 1/62. y > x > w > z.
    assert rrf([[x, y, z], [y, w, x]]) == [y, x, w, z]
    assert rrf([[x, y], [y, x]]) == [x, y]  # a tie keeps first-seen order
    assert rrf([[x, y, z]], depth=2) == [x, y]


# --- BM25 -----------------------------------------------------------------------------------


def test_tokenize_lowercases_splits_identifiers_and_drops_stop_words() -> None:
    assert tokenize("What's Biscuit's order #A-88213 in Neukölln?") == [
        "biscuit",
        "order",
        "88213",
        "neukölln",
    ]


@pytest.mark.parametrize(
    ("user_id", "text"),
    [
        ("maya", "What was order #A-88213 for?"),
        ("maya", "When does TP1306 depart?"),
        ("tom", "What's the status of Argos order 6021447?"),
        ("raj", "Was anything missing from INV-2304?"),
    ],
)
def test_bm25_ranks_an_exact_identifier_questions_evidence_first(
    corpus: Corpus, user_id: str, text: str
) -> None:
    question = _find(corpus, user_id, text)
    ranked = BM25Ranker(corpus)(question)
    assert ranked[0] in question.evidence


def test_bm25_searches_the_role() -> None:
    # "Priya" is only the speaker of the evidence, never a word of its content.
    said = [
        ("Maya", "we're picking the next novel tonight"),
        ("Priya", "I've been pushing Piranesi for months"),
        ("Maya", "the dog chewed a shoe"),
    ]
    messages = tuple(
        Message(_key(i), role, "user", content) for i, (role, content) in enumerate(said)
    )
    question = _question("What did Priya suggest?", {_key(1)}, "mixed")
    assert BM25Ranker(Corpus(messages, (question,)))(question) == [_key(1)]


def test_bm25_searches_only_the_questions_user(corpus: Corpus) -> None:
    bm25 = BM25Ranker(corpus)
    for q in corpus.questions:
        assert {k.user_id for k in bm25(q)} <= {q.user_id}


# --- report ---------------------------------------------------------------------------------


def test_report_prints_a_table_and_returns_the_figures(corpus: Corpus) -> None:
    def oracle(q: Question) -> list[MessageKey]:
        return sorted(q.evidence)

    out = io.StringIO()
    figures = report({"oracle": oracle, "nothing": lambda q: []}, corpus, out)
    assert figures["rankers"]["oracle"]["overall"] == {
        "recall_at_5": 1.0,
        "recall_at_10": 1.0,
        "mrr": 1.0,
    }
    assert figures["rankers"]["nothing"]["by_kind"]["mixed"]["recall_at_10"] == 0.0
    assert len(figures["only_found_by"]["oracle"]["nothing"]) == len(corpus.questions)
    assert figures["corpus"]["questions"] == len(corpus.questions)
    table = out.getvalue()
    assert "oracle" in table
    assert "R@10 paraphrase" in table
