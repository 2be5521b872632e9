"""Where a REST body spells a lone surrogate: the path the 400 names, on bodies of any shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.rest.body import _lone_surrogate

_MANY = 200_000


def _body(text: str) -> Any:
    return json.loads(text)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('{"user_id": "\\ud800"}', "user_id"),
        ('{"metadata": {"\\udc00": 1}}', "metadata"),
        ('{"\\ud800": 1}', "body"),
        ('{"messages": [{"content": "ok"}, {"role": "x\\udfff"}]}', "messages[1].role"),
        ('{"metadata": {"a": [[[], {}, [0, ["\\ud800"]]]]}}', "metadata.a[0][2][1][0]"),
        # Behind many values that hold no text, first or last.
        ('{"metadata": {"a": ["\\ud800", ' + "0, " * _MANY + "0]}}", "metadata.a[0]"),
        ('{"metadata": {"a": [' + "0, " * _MANY + '"\\ud800"]}}', f"metadata.a[{_MANY}]"),
        (
            '{"metadata": {"a": [' + "[], {}, " * _MANY + '{"b": "\\ud800"}]}}',
            f"metadata.a[{2 * _MANY}].b",
        ),
    ],
)
def test_the_path_of_a_lone_surrogate_is_found_in_any_shape(text: str, path: str) -> None:
    assert _lone_surrogate(_body(text)) == path


@pytest.mark.parametrize(
    "text",
    [
        '{"user_id": "a\\ud83d\\ude00", "metadata": {"\\ud83d\\ude00": ["\\ud83d\\ude00"]}}',
        '{"metadata": {"a": [' + "[], {}, 0, null, true, " * 1000 + '"x"]}}',
        "{}",
    ],
)
def test_pairs_and_values_without_text_hold_no_lone_surrogate(text: str) -> None:
    assert _lone_surrogate(_body(text)) is None
