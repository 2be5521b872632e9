"""Where GetMemory reads its messages up to the answer's bytes (answer_size.memory_budget)."""

from __future__ import annotations

from server.api.answer_size import MAX_ANSWER_BYTES, memory_budget
from server.api.validation import MAX_CONTENT_BYTES


def test_a_window_that_cannot_pass_the_answer_is_read_whole() -> None:
    # An agent's turn (lastn 6, Zep's default) and any lastn whose messages of the largest
    # content stay within the answer: no running sum on the hot path.
    assert memory_budget(6) is None
    assert memory_budget(MAX_ANSWER_BYTES // MAX_CONTENT_BYTES) is None


def test_a_window_that_can_pass_the_answer_is_read_up_to_it() -> None:
    assert memory_budget(MAX_ANSWER_BYTES // MAX_CONTENT_BYTES + 1) == MAX_ANSWER_BYTES
    assert memory_budget(1000) == MAX_ANSWER_BYTES
