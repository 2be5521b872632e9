"""Where GetMemory reads its messages up to the answer's bytes (answer_size.memory_budget)."""

from __future__ import annotations

from server.api.answer_size import MAX_ANSWER_BYTES, MESSAGE_ROW_BYTES, memory_budget


def test_a_window_that_cannot_pass_the_answer_is_read_whole() -> None:
    # An agent's turn (lastn 6, Zep's default) and any lastn whose messages of the largest
    # content and metadata stay within the answer: no running sum on the hot path.
    assert memory_budget(6) is None
    assert memory_budget(10) is None  # SearchMemory's default limit
    assert memory_budget(MAX_ANSWER_BYTES // MESSAGE_ROW_BYTES) is None


def test_a_window_that_can_pass_the_answer_is_read_up_to_it() -> None:
    # 16 messages of 1 MiB of content and 64 KiB of metadata pass 17 MiB: the window counts
    # both (it counted content alone, and read 17 of them whole).
    assert memory_budget(MAX_ANSWER_BYTES // MESSAGE_ROW_BYTES + 1) == MAX_ANSWER_BYTES
    assert memory_budget(16) == MAX_ANSWER_BYTES
    assert memory_budget(1000) == MAX_ANSWER_BYTES
