"""zep-cloud 2.x (the newest 2.x: 2.22.1) runs unchanged against memstore's `/api/v2`."""

from __future__ import annotations

from tests.fix_rest import ZepServer, run_sdk


def test_users_and_sessions_with_a_flat_get_sessions(zep: ZepServer) -> None:
    assert run_sdk("cloud", "users_and_sessions", zep.base_url) == {"sessions": ["d-1", "d-2"]}


def test_memory_messages_search_delete_and_revive(zep: ZepServer) -> None:
    assert run_sdk("cloud", "memory", zep.base_url) == {"hits": 2}


def test_async_client(zep: ZepServer) -> None:
    assert run_sdk("cloud", "asynchronous", zep.base_url) == {"session": "f-1"}


def test_zep_api_url_points_the_sdk_at_memstore(zep: ZepServer) -> None:
    assert run_sdk("cloud", "from_environment", zep.base_url) == {"user": "env-user"}


def test_memory_add_returns_the_context_when_asked(zep: ZepServer) -> None:
    assert run_sdk("cloud", "added_with_context", zep.base_url) == {"remembered": True}


def test_lists_without_a_page_size_answer_every_row(zep: ZepServer) -> None:
    # get_session_messages(), user.list_ordered() and list_sessions() send no page size, and
    # Zep's server answers every row: memstore answered 50 (until 2026-12-03).
    assert run_sdk("cloud", "whole_lists", zep.base_url) == {
        "counts": [[60, 60], [59, 59], [60, 60]]
    }
