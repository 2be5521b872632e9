"""HTTP access lines say what gRPC's say: the caller's address, and for a failed request
the reason, the message and (for a bad field) the field."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from server.serving.log_format import JsonFormatter


async def test_http_access_lines_name_peer_reason_message_and_field(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="memstore.access"):
        missing = await http.get("/api/v2/users/nobody", headers={"x-request-id": "r-404"})
        bad = await http.post(
            "/api/v2/users", json={"user_id": "x" * 300}, headers={"x-request-id": "r-400"}
        )
        fine = await http.get("/healthz", headers={"x-request-id": "r-200"})
    assert (missing.status_code, bad.status_code, fine.status_code) == (404, 400, 200)
    lines = {
        getattr(r, "request_id", ""): json.loads(JsonFormatter().format(r))
        for r in caplog.records
        if r.name == "memstore.access"
    }
    assert lines["r-404"]["reason"] == "USER_NOT_FOUND" and "nobody" in lines["r-404"]["error"]
    assert lines["r-404"]["peer"].startswith("127.0.0.1:")
    assert lines["r-400"]["fields"] == ["user_id"] and lines["r-400"]["code"] == 400
    assert "reason" not in lines["r-200"] and lines["r-200"]["peer"]
