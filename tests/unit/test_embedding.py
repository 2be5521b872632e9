"""The embedding models: the real bundled model, and a real HTTP server on loopback."""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from server.search import (
    EmbeddingError,
    LocalEmbedder,
    OpenAIEmbedder,
    embedder_from_setting,
)
from tests.fake_embedder import FakeServer, serving


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.hypot(*a) / math.hypot(*b)


@pytest.fixture(scope="module")
def local() -> LocalEmbedder:
    embedder = LocalEmbedder()
    embedder.load()
    return embedder


# -- the local model ------------------------------------------------------------------------


def test_local_names_its_model_and_gives_384_floats(local: LocalEmbedder) -> None:
    [vector] = local.embed(["Remind me to call the dentist on Monday."])
    assert local.name == "all-MiniLM-L6-v2-int8"
    assert local.dimensions == 384
    assert len(vector) == 384
    assert all(isinstance(x, float) for x in vector)


def test_local_vectors_are_unit_length(local: LocalEmbedder) -> None:
    vectors = local.embed(["hi", "The deploy failed again because the disk is full.", "ok 👍"])
    for vector in vectors:
        assert math.hypot(*vector) == pytest.approx(1.0, abs=1e-5)


def test_local_vector_does_not_depend_on_the_rest_of_the_call(local: LocalEmbedder) -> None:
    short = "Can we move the meeting to Friday?"
    longer = [
        "Our quarterly budget review overran, so " * 12,
        "I tried resetting the database password but the admin console kept timing out. " * 8,
        "ok",
    ]
    [alone] = local.embed([short])
    batch = local.embed([longer[0], short, *longer[1:], *longer])
    assert cosine(alone, batch[1]) > 0.9999
    # Order is kept although runs are grouped by length inside.
    assert cosine(batch[0], batch[4]) > 0.9999
    assert cosine(batch[3], batch[6]) > 0.9999


def test_local_ranks_paraphrases_above_unrelated_texts(local: LocalEmbedder) -> None:
    pairs = [
        (
            "Can we move the meeting to Friday?",
            "Is it possible to reschedule our meeting for Friday?",
        ),
        ("My flight to Lisbon was cancelled.", "The airline called off my plane to Lisbon."),
        ("I forgot my password and can't log in.", "I can't sign in because I lost my password."),
        ("Please order more coffee beans.", "We need to buy additional coffee beans."),
    ]
    vectors = local.embed([text for pair in pairs for text in pair])
    firsts, seconds = vectors[0::2], vectors[1::2]
    for i, first in enumerate(firsts):
        paraphrase = cosine(first, seconds[i])
        unrelated = max(cosine(first, other) for j, other in enumerate(seconds) if j != i)
        assert paraphrase > 0.6
        assert paraphrase > unrelated + 0.3


def test_local_embeds_nothing_for_no_texts(local: LocalEmbedder) -> None:
    assert local.embed([]) == []


def test_local_refuses_one_bare_string(local: LocalEmbedder) -> None:
    with pytest.raises(TypeError, match="sequence of texts"):
        local.embed("a string is a sequence of one-letter texts")


def test_local_truncates_a_long_text_to_its_start(local: LocalEmbedder) -> None:
    start = " ".join(f"word{i} alpha beta" for i in range(300))  # well past 256 tokens
    huge = start + " the end is entirely different: pizza volcano jazz" * 20_000  # ~1 MB
    [a, b] = local.embed([start, huge])
    assert cosine(a, b) > 0.9999


def test_local_handles_unicode_emoji_and_empty_text(local: LocalEmbedder) -> None:
    texts = [
        "🚀🎉🔥",
        "日本語のテキストです",
        "naïve café Ünïcödé",
        "",
        "   \n\t",
        "\x00 zero byte",
    ]
    for vector in local.embed(texts):
        assert len(vector) == 384
        assert all(math.isfinite(x) for x in vector)
        assert math.hypot(*vector) == pytest.approx(1.0, abs=1e-5)
    # The model's own normaliser: lower case, accents stripped.
    [accented, plain] = local.embed(["Café Crème", "cafe creme"])
    assert cosine(accented, plain) > 0.9999


def test_local_is_safe_to_call_from_several_threads(local: LocalEmbedder) -> None:
    texts = [f"message number {i} about the project deadline" for i in range(12)]
    expected = local.embed(texts)
    results: list[list[list[float]]] = [[] for _ in range(4)]

    def work(slot: int) -> None:
        results[slot] = local.embed(texts)

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        assert all(cosine(a, b) > 0.9999 for a, b in zip(result, expected, strict=True))


def test_local_is_free_to_construct_and_checks_threads() -> None:
    embedder = LocalEmbedder(intra_op_threads=2)
    assert embedder._model is None  # nothing is loaded until first use
    assert embedder.dimensions == 384  # and the model's shape needs no loading
    assert embedder._model is None
    with pytest.raises(ValueError, match="intra_op_threads"):
        LocalEmbedder(intra_op_threads=0)


# -- an OpenAI-compatible server --------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with serving() as state:
        yield state


def test_openai_sends_model_and_texts_and_sorts_by_index(fake: FakeServer) -> None:
    embedder = OpenAIEmbedder(fake.url, "team-model", api_key="sk-secret")
    vectors = embedder.embed(["a", "abc"])
    headers, request = fake.requests[0]
    assert request == {"model": "team-model", "input": ["a", "abc"]}
    assert headers["Authorization"] == "Bearer sk-secret"
    assert headers["Content-Type"] == "application/json"
    assert vectors[0] == pytest.approx([2 / math.sqrt(6), 1 / math.sqrt(6), 1 / math.sqrt(6)])
    assert vectors[1] == pytest.approx([4 / math.sqrt(18), 1 / math.sqrt(18), 1 / math.sqrt(18)])
    assert embedder.name == "team-model"


def test_openai_sends_no_key_when_none_is_given(fake: FakeServer) -> None:
    OpenAIEmbedder(fake.url, "m").embed(["x"])
    headers, _ = fake.requests[0]
    assert "Authorization" not in headers


def test_openai_learns_dimensions_from_the_first_answer(fake: FakeServer) -> None:
    fake.dims = 5
    embedder = OpenAIEmbedder(fake.url, "m")
    assert embedder.dimensions == 5  # one probe request
    assert len(fake.requests) == 1
    assert len(embedder.embed(["x", "y"])[1]) == 5
    fake.dims = 4
    with pytest.raises(EmbeddingError, match="4-dimensional vectors, not 5"):
        embedder.embed(["x"])


def test_openai_given_dimensions_need_no_request(fake: FakeServer) -> None:
    embedder = OpenAIEmbedder(fake.url, "m", dimensions=3)
    assert embedder.dimensions == 3
    assert embedder.embed([]) == []
    assert fake.requests == []


def test_openai_error_status_names_the_url_and_status(fake: FakeServer) -> None:
    fake.status = 401
    fake.body = b'{"error": {"message": "Incorrect API key provided"}}'
    embedder = OpenAIEmbedder(fake.url, "m", api_key="sk-secret")
    with pytest.raises(EmbeddingError) as caught:
        embedder.embed(["x"])
    error = caught.value
    assert error.status == 401
    assert error.url == fake.url
    assert str(error).startswith(f"embedding POST {fake.url} returned HTTP 401:")
    assert "Incorrect API key provided" in str(error)
    assert "sk-secret" not in str(error)


@pytest.mark.parametrize("status", [401, 200])
def test_openai_error_masks_an_echoed_key_and_bearer_tokens(fake: FakeServer, status: int) -> None:
    # A server (or a proxy before it) that echoes what it refused: the error is logged, so
    # the key it quotes must not reach the log, whether the answer is an error status or
    # a 200 that is not JSON; and a long answer is cut.
    key = "sk-live-0123456789abcdef"
    fake.status = status
    fake.body = (
        f"denied: api_key={key}; headers: Authorization: Bearer {key}; "
        "upstream: authorization: bearer other.Token-123/x= " + "y" * 5000
    ).encode()
    with pytest.raises(EmbeddingError) as caught:
        OpenAIEmbedder(fake.url, "m", api_key=key).embed(["x"])
    text = str(caught.value)
    assert key not in text and "other.Token" not in text and "0123456789" not in text, text
    assert "api_key=[redacted]" in text and "Bearer [redacted]" in text, text
    assert len(text) < 500, text


def test_openai_error_leaves_out_the_query(fake: FakeServer) -> None:
    url = fake.url.replace("/v1/", "/v2/")
    with pytest.raises(EmbeddingError, match=f"POST {url} returned HTTP 404") as caught:
        OpenAIEmbedder(url + "?key=secret", "m").embed(["x"])
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>bad gateway</html>", "not JSON"),
        (b'{"data": [{"index": 0}]}', "no usable data"),
        (b'{"data": []}', "no vectors"),
        (b'{"data": [{"index": 0, "embedding": [1.0, 2.0]}]}', "1 vectors for 2 texts"),
        (
            b'{"data": [{"index": 0, "embedding": [1]}, {"index": 1, "embedding": [1, 2]}]}',
            "usable",
        ),
        (b'{"data": [{"index": 0, "embedding": [NaN]}, {"index": 1, "embedding": [1]}]}', "NaN"),
    ],
)
def test_openai_refuses_an_answer_it_cannot_use(
    fake: FakeServer, body: bytes, message: str
) -> None:
    fake.body = body
    with pytest.raises(EmbeddingError, match=message):
        OpenAIEmbedder(fake.url, "m").embed(["x", "y"])


def test_openai_unreachable_server_is_an_embedding_error() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    with pytest.raises(EmbeddingError, match=f"POST {url} failed") as caught:
        OpenAIEmbedder(url, "m").embed(["x"])
    assert caught.value.status is None


def test_openai_slow_server_times_out(fake: FakeServer) -> None:
    fake.delay = 1.0
    with pytest.raises(EmbeddingError, match=r"failed: .*timed out"):
        OpenAIEmbedder(fake.url, "m", timeout=0.2).embed(["x"])


@pytest.mark.parametrize(
    ("url", "model", "kwargs"),
    [
        ("file:///etc/passwd", "m", {}),
        ("http:///v1/embeddings", "m", {}),
        ("http://user:pw@127.0.0.1/v1/embeddings", "m", {}),
        ("http://127.0.0.1/v1/embeddings", "", {}),
        ("http://127.0.0.1/v1/embeddings", "m", {"timeout": 0}),
        ("http://127.0.0.1/v1/embeddings", "m", {"dimensions": 0}),
    ],
)
def test_openai_refuses_bad_arguments(url: str, model: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        OpenAIEmbedder(url, model, **kwargs)


# -- the setting ------------------------------------------------------------------------------


def test_setting_local_none_and_url() -> None:
    assert isinstance(embedder_from_setting(), LocalEmbedder)
    assert isinstance(embedder_from_setting(" Local "), LocalEmbedder)
    assert embedder_from_setting("none") is None
    remote = embedder_from_setting("https://emb.example/v1/embeddings", model="bge-small")
    assert isinstance(remote, OpenAIEmbedder)
    assert remote.name == "bge-small"


@pytest.mark.parametrize(
    ("value", "model", "message"),
    [
        ("gpu", None, "bad embedding setting 'gpu': expected 'local', 'none' or an http"),
        ("", None, "bad embedding setting ''"),
        ("ftp://emb.example/v1/embeddings", "m", "bad embedding setting"),
        ("http://emb.example/v1/embeddings", None, "needs a model name"),
        ("local", "bge-small", "only used with a URL"),
    ],
)
def test_setting_bad_values_say_what_is_wrong(value: str, model: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        embedder_from_setting(value, model=model)
