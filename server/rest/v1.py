"""/api/v1: the routes zep-python 1.x (`ZepClient`) and LangChain's Zep integration call."""

from __future__ import annotations

from starlette.routing import BaseRoute


def routes() -> list[BaseRoute]:
    """The /api/v1 routes memstore serves (docs/zep-compat.md has the table)."""
    return []
