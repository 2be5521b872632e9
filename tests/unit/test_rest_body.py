"""Where a REST body spells a lone surrogate or repeats a key: the path the 400 names, on
bodies of any shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.rest.body import _lone_surrogate, _parse, _repeated_key

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


@pytest.mark.parametrize(
    ("text", "path", "key"),
    [
        ('{"a": 1, "a": 1}', "a", "a"),
        ('{".x": {}, ".x": []}', ".x", ".x"),
        ('{"a": [[], {}, [[{"b": {"c": [0, 1, {"d": 1, "e": 2, "d": 3}]}}]]]}',
         "a[2][0][0].b.c[2].d", "d"),
        ('{"m": {"x": [], "y": 1, "x": []}}', "m.x", "x"),
        ('{"m": [[{}], [{"k": 1, "k": 2}]]}', "m[1][0].k", "k"),
        # The first in the body's order, behind many values that repeat nothing.
        ('{"a": [' + '{"k": 1}, ' * _MANY + '{"b": {"c": 1, "c": 1}}], "d": {"e": 1, "e": 1}}',
         f"a[{_MANY}].b.c", "c"),
        ('{"a": {"b": 1, "b": 2}, "c": [' + "0, " * _MANY + '{"d": 1, "d": 2}]}', "a.b", "b"),
    ],
)  # fmt: skip
def test_the_path_of_a_repeated_key_is_found_in_any_shape(text: str, path: str, key: str) -> None:
    value, repeated = _parse(text)
    assert repeated
    error = _repeated_key(value)
    assert [(v.field, v.description) for v in error.violations] == [
        (path, f"repeats the key {key!r} in one object; give each key once")
    ]


@pytest.mark.parametrize(
    "text",
    [
        '{"a": {"a": {"a": [{"a": 1}, {"b": 2, "a": 3}]}}, "b": {}, "c": [{}, {"c": null}]}',
        '{"a": [' + '{"k": 1}, ' * 1000 + "{}]}",
    ],
)
def test_objects_that_repeat_no_key_parse_as_without_the_hook(text: str) -> None:
    assert _parse(text) == (json.loads(text), False)
