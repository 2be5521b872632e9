"""zep-python 2.0.2 (`zep_python.client.Zep`, `/api/v2`) runs unchanged against memstore."""

from __future__ import annotations

import grpc

from memstore.v1 import session_service_pb2 as spb
from memstore.v1 import session_service_pb2_grpc
from tests.fix_rest import ZepServer, run_sdk


def test_users_add_get_update_merge_list_sessions_and_delete_with_sessions(zep: ZepServer) -> None:
    assert run_sdk("zep2", "users", zep.base_url) == {
        "deleted": "OK",
        # users-ordered, page by page: none twice, none skipped, newest first as Zep's
        # (until 2026-12-03 oldest first).
        "listed": ["u-4", "u-3", "u-2", "u-1", "u-0", "alice"],
    }


def test_sessions_create_update_merge_and_pages_by_number(zep: ZepServer) -> None:
    result = run_sdk("zep2", "sessions", zep.base_url)
    assert result == {"listed": [f"s-{i}" for i in range(1, 8)]}


def test_memory_add_get_delete_revive_and_messages(zep: ZepServer) -> None:
    assert run_sdk("zep2", "memory", zep.base_url) == {"revived": ["back"]}


def test_what_the_sdk_wrote_is_what_grpc_reads(zep: ZepServer) -> None:
    run_sdk("zep2", "memory", zep.base_url)
    with grpc.insecure_channel(f"127.0.0.1:{zep.grpc_port}") as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        listed = stub.ListMessages(spb.ListMessagesRequest(session_id="m-1"))
        deleted = stub.GetSession(spb.GetSessionRequest(session_id="m-1", show_deleted=True))
    assert [m.content for m in listed.messages] == ["back"]
    assert deleted.session.message_count == 1


def test_search_sessions_and_recall_in_memory_get(zep: ZepServer) -> None:
    assert run_sdk("zep2", "search", zep.base_url) == {"sessions": ["maya-1", "maya-2"]}


def test_async_client(zep: ZepServer) -> None:
    assert run_sdk("zep2", "asynchronous", zep.base_url) == {"contents": ["async hello"]}
