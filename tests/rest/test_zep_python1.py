"""zep-python 1.5.0 (`ZepClient`, `/api/v1`, `/healthz`) and LangChain's Zep chat history."""

from __future__ import annotations

from tests.fix_rest import ZepServer, run_sdk


def test_users_list_chunked_repeats_and_skips_nothing_across_gaps(zep: ZepServer) -> None:
    assert run_sdk("zep1", "users", zep.base_url) == {
        "chunks": [["gil", "v-0"], ["v-1", "v-3"], ["v-4", "v-5"], ["v-6"]]
    }


def test_sessions_memory_search_and_messages(zep: ZepServer) -> None:
    # add_memory and delete_memory return the answer's text, Zep 0.27.2's plain "OK": until
    # 2026-12-03 memstore answered '{"message": "OK"}', which they returned.
    assert run_sdk("zep1", "memory", zep.base_url) == {
        "found": 1,
        "added": "OK",
        "deleted": "OK",
    }


def test_langchain_zep_chat_message_history(zep: ZepServer) -> None:
    assert run_sdk("zep1", "langchain", zep.base_url) == {
        "kinds": ["HumanMessage", "AIMessage", "HumanMessage", "AIMessage"],
        "tools": {"window": 12, "empty": 3},
    }
