"""Re-ranking for diversity (maximal marginal relevance) and the recall context block."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from server.domain import SearchResult


def mmr(
    candidates: Sequence[tuple[SearchResult, list[float] | None]], limit: int, lam: float
) -> list[SearchResult]:
    """Picks `limit` candidates by maximal marginal relevance (mmr_order)."""
    order = mmr_order([c[0].score for c in candidates], [c[1] for c in candidates], limit, lam)
    return [candidates[i][0] for i in order]


def mmr_order(
    scores: Sequence[float], vectors: Sequence[list[float] | None], limit: int, lam: float
) -> list[int]:
    """The positions of `limit` candidates (their `scores` and `vectors`) picked by maximal
    marginal relevance (Carbonell & Goldstein, 1998), in the order picked.

    Each pick maximises lam * relevance - (1 - lam) * (highest cosine similarity to a pick
    so far). Relevance is the candidate's score scaled to [0, 1] by the best score, so the
    lambda means the same whatever the ranker. A candidate without a vector is similar to
    nothing (it keeps its place by relevance).
    """
    if not scores or limit <= 0:
        return []
    relevance = np.array(scores, dtype=np.float64)
    top = relevance.max()
    relevance = relevance / top if top > 0 else np.zeros_like(relevance)
    dims = next((len(v) for v in vectors if v is not None), 0)
    matrix = np.zeros((len(scores), dims), dtype=np.float32)
    for i, vector in enumerate(vectors):
        if vector is not None:
            matrix[i] = vector
    norms = np.linalg.norm(matrix, axis=1)
    matrix /= np.where(norms > 0, norms, 1.0)[:, None]
    # Highest similarity of each candidate to anything picked so far.
    closest = np.zeros(len(scores), dtype=np.float64)
    chosen = np.zeros(len(scores), dtype=bool)
    picked: list[int] = []
    for _ in range(min(limit, len(scores))):
        gain = lam * relevance - (1 - lam) * closest
        gain[chosen] = -np.inf
        best = int(np.argmax(gain))
        chosen[best] = True
        picked.append(best)
        closest = np.maximum(closest, matrix @ matrix[best])
    return picked


#: The first line of a context block: what the lines below it are, for the model reading it.
CONTEXT_HEADER = "Relevant memories from this user's other conversations (oldest first):"

#: Characters of one memory's content in a context block; a longer one is cut with "...".
CONTEXT_LINE_CHARS = 1000


def context_block(memories: Sequence[SearchResult]) -> str:
    """The memories as prompt text: one line each, oldest first, with date and speaker."""
    if not memories:
        return ""
    lines = [CONTEXT_HEADER]
    for found in sorted(memories, key=lambda r: (r.message.created_at, r.message.sequence)):
        message = found.message
        at = message.created_at
        # What strftime("%Y-%m-%d %H:%M") writes (glibc: no padding of years < 1000), cheaper.
        when = f"{at.year}-{at.month:02d}-{at.day:02d} {at.hour:02d}:{at.minute:02d}"
        # Each collapsed to one line: a role holding a line break (one restored from before
        # roles were checked, or a separator AddMemory let through until 2026-12-02) wrote
        # lines of its own, a memory a caller never stored.
        speaker = " ".join((message.role or message.role_type).split())
        content = " ".join(message.content.split())
        if len(content) > CONTEXT_LINE_CHARS:
            content = content[: CONTEXT_LINE_CHARS - 3] + "..."
        lines.append(f"- ({when} UTC) {speaker}: {content}")
    return "\n".join(lines)
