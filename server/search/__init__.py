"""Embedding models for search and recall: the bundled local model, or an HTTP endpoint."""

from __future__ import annotations

from server.search.embedding import (
    Embedder,
    EmbeddingError,
    LocalEmbedder,
    embedder_from_setting,
)
from server.search.remote import OpenAIEmbedder

__all__ = [
    "Embedder",
    "EmbeddingError",
    "LocalEmbedder",
    "OpenAIEmbedder",
    "embedder_from_setting",
]
