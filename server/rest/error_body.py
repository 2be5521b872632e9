"""The JSON body of every REST error, routed or refused before routing (server/rest/app.py,
server/rest/protocol.py): Zep's `message`, and memstore's reason and fields."""

from __future__ import annotations

from typing import Any

from server.errors import InvalidArgument, MemstoreError


def error_body(error: MemstoreError) -> dict[str, Any]:
    """`error` as the body of its answer; `violations` name the fields of a bad request."""
    body: dict[str, Any] = {"message": error.message, "reason": error.reason}
    if isinstance(error, InvalidArgument):
        body["violations"] = [
            {"field": v.field, "description": v.description} for v in error.violations
        ]
    return body
