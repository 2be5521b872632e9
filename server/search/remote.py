"""An embedding model behind an OpenAI-compatible /v1/embeddings endpoint, over HTTP(S)."""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from server.search.embedding import EmbeddingError, normalise

#: Bytes of an error answer read to quote from it: past what is shown, so that a key that
#: straddles the cut is whole when it is masked.
_BODY_READ_BYTES = 4096
#: Characters of a server's answer an error quotes (the rest is "...").
_BODY_SHOWN_CHARS = 300
#: What a key or token in a quoted answer is replaced by.
_MASK = "[redacted]"
#: A bearer token as an Authorization header carries it (RFC 6750's b64token).
_BEARER = re.compile(r"\bBearer\s+[A-Za-z0-9._~+/-]+=*", re.IGNORECASE)


class OpenAIEmbedder:
    """A model behind an OpenAI-compatible `/v1/embeddings` endpoint, over HTTP(S).

    For teams that run their own embedding server (vLLM, Ollama, TEI, OpenAI itself).
    Each `embed` is one POST; vectors are L2-normalised here, whatever the server does.

    Args:
        url: The full endpoint URL, e.g. `http://127.0.0.1:8000/v1/embeddings`.
        model: The model name sent in each request; also this embedder's `name`.
        api_key: Sent as `Authorization: Bearer …` when given.
        timeout: Seconds each connect or read may block.
        dimensions: The vector length, if known; otherwise learned from the first answer.

    Raises:
        ValueError: the URL is not http(s) with a host, the model name is empty, or the
            timeout or dimensions are not positive.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        dimensions: int | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        # urlopen would also read file:// and ftp:// URLs; a setting must not reach those.
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the embedding URL must be http(s)://host/…, not {url!r}")
        if parts.username is not None:  # urllib would take user:password@ for the host name
            raise ValueError("the embedding URL must not carry credentials: pass an API key")
        if not model:
            raise ValueError("the embedding model name must not be empty")
        if not timeout > 0:
            raise ValueError(f"the embedding timeout must be positive, not {timeout}")
        if dimensions is not None and dimensions < 1:
            raise ValueError(f"embedding dimensions must be positive, not {dimensions}")
        self._url = url
        # Errors name the endpoint without its query, where some servers take their key.
        self._display_url = urllib.parse.urlunsplit(parts._replace(query="", fragment=""))
        self._model = model
        self._api_key = api_key
        self._timeout = timeout
        self._dimensions = dimensions
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The model name, as sent to the server."""
        return self._model

    @property
    def dimensions(self) -> int:
        """The vector length: as given, or learned by embedding one probe text if unknown.

        Raises:
            EmbeddingError: it had to be learned, and the server failed.
        """
        if self._dimensions is None:
            self.embed(["dimensions probe"])
        assert self._dimensions is not None  # embed() sets it or raises
        return self._dimensions

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector per text, in order, from one POST.

        Raises:
            TypeError: `texts` is a single string rather than a sequence of them.
            EmbeddingError: the server could not be reached, answered with an error
                status, or sent an answer that is not one vector per text of one length.
        """
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        if not texts:
            return []  # OpenAI refuses an empty input list
        answer = self._post({"model": self._model, "input": list(texts)})
        vectors = self._vectors(answer, len(texts))
        with self._lock:
            if self._dimensions is None:
                self._dimensions = vectors.shape[1]
            elif vectors.shape[1] != self._dimensions:
                raise self._error(
                    f"returned {vectors.shape[1]}-dimensional vectors, not {self._dimensions}"
                )
        unit: list[list[float]] = normalise(vectors).tolist()
        return unit

    def _post(self, body: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            self._url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            with exc:  # its connection closed, though its answer is read only in part
                detail = self._shown(exc.read(_BODY_READ_BYTES).decode("utf-8", "replace"))
            raise self._error(f"returned HTTP {exc.code}: {detail}", status=exc.code) from exc
        except (OSError, http.client.HTTPException) as exc:  # refused, DNS, TLS, timeout, cut
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise self._error(f"failed: {reason}") from exc
        try:
            return json.loads(payload)
        except ValueError as exc:
            shown = self._shown(payload[:_BODY_READ_BYTES].decode("utf-8", "replace"))
            raise self._error(f"returned a body that is not JSON: {shown!r}") from exc

    def _vectors(self, answer: Any, count: int) -> npt.NDArray[np.float64]:
        """The answer's `data[i].embedding`, sorted by `index`, as one matrix."""
        try:
            items = sorted(answer["data"], key=lambda item: int(item["index"]))
            rows = [item["embedding"] for item in items]
            vectors: npt.NDArray[np.float64] = np.array(rows, dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:  # ragged rows are a ValueError too
            raise self._error(f"returned no usable data[].embedding: {exc!r}") from exc
        if vectors.ndim != 2 or vectors.shape[1] == 0:
            raise self._error(f"returned no vectors for {count} texts")
        if vectors.shape[0] != count:
            raise self._error(f"returned {vectors.shape[0]} vectors for {count} texts")
        if not np.isfinite(vectors).all():
            raise self._error("returned a vector with NaN or infinity")
        return vectors

    def _shown(self, body: str) -> str:
        """What an error may say of the server's `body`: the API key and bearer tokens masked,
        then cut to _BODY_SHOWN_CHARS. The error is logged (each failed batch, each failed
        search), and a server that echoes the request's Authorization header or the key it
        refused (some proxies do) would write the key into the log."""
        if self._api_key:
            body = body.replace(self._api_key, _MASK)
        body = _BEARER.sub(f"Bearer {_MASK}", body).strip()
        if len(body) > _BODY_SHOWN_CHARS:
            body = body[:_BODY_SHOWN_CHARS] + "..."
        return body

    def _error(self, what: str, *, status: int | None = None) -> EmbeddingError:
        return EmbeddingError(
            f"embedding POST {self._display_url} {what}", url=self._display_url, status=status
        )
