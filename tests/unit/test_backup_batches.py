"""`memstore restore` sends batches that fit the server's 16 MiB request limit, in bytes.

It weighed a batch by the characters of its lines: messages of 1 MiB of emoji (the content
limit; 4 bytes each in UTF-8) made a batch of 16 whose request was 16,778,384 bytes, which the
channel refused every time (and `--resume` with it).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from memstore.v1 import backup_service_pb2 as bs
from memstore_client.backup_cli import _batches
from memstore_client.types import message_backup_proto

LIMIT = 16 * 1024 * 1024
#: 1 MiB of content as UTF-8: the content limit, in characters of 4 bytes.
EMOJI = "\U0001f600" * (1024 * 1024 // 4)


def test_a_batch_of_the_largest_messages_fits_the_request_limit(tmp_path: Path) -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
    rows = [
        {
            "kind": "message",
            "session_id": "s",
            "uuid": f"00000000-0000-4000-8000-{i:012x}",
            "sequence": i + 1,
            "role": "",
            "role_type": "user",
            "content": EMOJI,
            "metadata": {},
            "created_at": at,
            "updated_at": at,
            "deleted_at": None,
        }
        for i in range(20)
    ]
    path = tmp_path / "backup.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    with path.open("rb") as source:
        batches = list(_batches(path, source))
    assert sum(len(batch) for _, batch in batches) == 20
    for kind, batch in batches:
        assert kind == "messages"
        request = bs.RestoreRequest(messages=[message_backup_proto(m) for m in batch])
        assert request.ByteSize() < LIMIT, (len(batch), request.ByteSize())
