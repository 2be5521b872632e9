"""Reading a REST request's JSON body, each bad member named by its field (its query and
path values: params.py).

The checks themselves are the gRPC API's (server/api/validation.py, metadata_checks.py):
metadata goes through the same Struct walk, so size, depth, NUL and number rules are
identical on both ports. What JSON allows and a Struct cannot hold is refused here, naming
its path: a key given twice in one object (the last won, silently), an integer beyond
+-2^53 (a double rounds it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from google.protobuf import struct_pb2
from starlette.requests import Request

from server import off_loop
from server.api import metadata_checks as meta
from server.api import validation as val
from server.domain import MAX_EXACT_INT, MAX_METADATA_DEPTH, JsonObject
from server.errors import InvalidArgument
from server.rest.media import check_json_body

T = TypeVar("T")

#: A \\uD800-\\uDFFF escape: JSON may spell a lone surrogate, which is no Unicode text.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def json_object(request: Request, *, required: bool = True) -> JsonObject:
    """The body as a JSON object; an empty body is {} unless `required`.

    Raises:
        InvalidArgument: the body is missing, not UTF-8 JSON, or not an object (`body`); a
            string holds a lone surrogate, an object repeats a key (naming its path).
        UnsupportedMediaType: the body is declared as other than JSON, or compressed.
        RequestTooLarge: the body is over the 16 MiB cap.
    """
    return await checked_json(request, _as_is, required=required)


async def checked_json(
    request: Request, check: Callable[[JsonObject], T], *, required: bool = True
) -> T:
    """`check` (a validation) of the body read as json_object reads it. For a large body
    both run in a thread (server/off_loop.py): parsing and checking 16 MiB of small
    values took seconds, and the loop serves both ports.

    Raises:
        InvalidArgument, UnsupportedMediaType, RequestTooLarge: as json_object; and what
            `check` raises.
    """
    raw = await request.body()
    if not raw.strip():
        if required:
            raise InvalidArgument.field("body", "is required: send a JSON object")
        return check({})
    check_json_body(request.headers)
    return await off_loop.run(len(raw), _checked, raw, check)


def _as_is(value: JsonObject) -> JsonObject:
    return value


def _checked(raw: bytes, check: Callable[[JsonObject], T]) -> T:
    return check(_object_of(raw))


def _object_of(raw: bytes) -> JsonObject:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument.field("body", "is not valid UTF-8") from None
    value, repeated = _parse(text)
    if not isinstance(value, dict):
        raise InvalidArgument.field("body", f"must be a JSON object, not {kind(value)}")
    if _SURROGATE_ESCAPE.search(raw):
        where = _lone_surrogate(value)
        if where is not None:
            raise InvalidArgument.field(
                where,
                "holds a lone surrogate (a \\ud800-\\udfff escape not in a pair), "
                "which is not Unicode text",
            )
    if repeated:
        raise _repeated_key(value)
    return value


def _parse(text: str) -> tuple[Any, bool]:
    """The body's value, and whether an object in it gives a key twice (then marked).

    Each object is checked as the parser builds it (object_pairs_hook), in the one pass: the
    dict the parser builds without a hook, and a length check. Without it the last of a
    repeated key won, silently.
    """
    repeated = False

    def unique_keys(pairs: list[tuple[str, Any]]) -> JsonObject:
        nonlocal repeated
        found = dict(pairs)
        if len(found) == len(pairs):
            return found
        repeated = True
        return _Repeated.of(found, pairs)

    try:
        value = json.loads(text, object_pairs_hook=unique_keys, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidArgument.field("body", "is nested too deeply") from None
    except ValueError as exc:
        raise InvalidArgument.field("body", f"is not valid JSON ({exc})") from None
    return value, repeated


class _Repeated(dict[str, Any]):
    """An object that gives `key` twice (its first repeated key), as _parse marks it."""

    key = ""

    @classmethod
    def of(cls, found: JsonObject, pairs: list[tuple[str, Any]]) -> _Repeated:
        marked = cls(found)
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                marked.key = key
                break
            seen.add(key)
        return marked


def _repeated_key(value: JsonObject) -> InvalidArgument:
    """The error naming the first object of `value` that _parse marked, in the body's order,
    by the path of its key: `metadata.a` for {"metadata": {"a": 1, "a": 2}}.

    Depth first over iterators, as the parser reads: no path string is made but the one
    named, so an object behind a million others is found in one pass.
    """
    names: list[str | int] = []
    members = [_members(value)]
    found = value if isinstance(value, _Repeated) else None
    while found is None and members:
        for name, child in members[-1]:
            if child.__class__ is _Repeated:
                names.append(name)
                found = child
                break
            if child and child.__class__ in _CONTAINERS:
                names.append(name)
                members.append(_members(child))
                break
        else:
            members.pop()
            if names:
                names.pop()
    assert found is not None, "_parse marked no object"
    path = "".join(f"[{n}]" if isinstance(n, int) else f".{n}" for n in [*names, found.key])
    return InvalidArgument.field(
        path.removeprefix("."),
        f"repeats the key {found.key[:64]!r} in one object; give each key once",
    )


_CONTAINERS = (dict, list)


def _members(container: Any) -> Iterator[tuple[str | int, Any]]:
    return iter(container.items()) if isinstance(container, dict) else enumerate(container)


def _lone_surrogate(value: JsonObject) -> str | None:
    """The path of a key or string holding a lone surrogate (e.g. `messages[0].role`).

    Iterative, as _shape_problem: the body may be nested deeply. Strings are checked where
    they stand and only non-empty containers are stacked, each with its path: a body of
    millions of numbers or empty containers (16 MiB holds 8 million) costs one pass of
    type checks, not a path string and a stack entry per value (which held the event loop
    for 9-12 s: `tests/rest/test_http.py`).
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if has_surrogate(key):
                    return path or "body"
                if type(child) is str:
                    if has_surrogate(child):
                        return f"{path}.{key}" if path else key
                elif child and isinstance(child, dict | list):
                    stack.append((child, f"{path}.{key}" if path else key))
        else:
            for i, child in enumerate(item):
                if type(child) is str:
                    if has_surrogate(child):
                        return f"{path}[{i}]"
                elif child and isinstance(child, dict | list):
                    stack.append((child, f"{path}[{i}]"))
    return None


def has_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate: no Unicode text, and no UTF-8 either."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def kind(value: Any) -> str:
    """How a JSON value's type is named in an error."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def optional_str(v: val.Violations, body: JsonObject, name: str, field: str = "") -> str | None:
    """A string member; None when absent or null."""
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    v.add(field or name, f"must be a string, not {kind(value)}")
    return None


def checked_str(
    v: val.Violations,
    body: JsonObject,
    name: str,
    check: Callable[[val.Violations, str, str], None],
    field: str = "",
) -> str:
    """A string member passed to `check`; absent or null is "" (which `check` may require).
    One of another type is named once, unchecked: it was also "required" as "" before."""
    field = field or name
    value = body.get(name)
    if value is None:
        value = ""
    elif not isinstance(value, str):
        v.add(field, f"must be a string, not {kind(value)}")
        return ""
    check(v, field, value)
    return value


def metadata(v: val.Violations, value: Any, field: str) -> JsonObject | None:
    """A metadata object checked as gRPC checks it; None when absent or null."""
    if value is None:
        return None
    if not isinstance(value, dict):
        v.add(field, f"must be an object, not {kind(value)}")
        return None
    problem = _shape_problem(value, MAX_METADATA_DEPTH + 1)
    if problem is not None:
        if isinstance(problem, int):
            v.add(_path_to(value, problem, field), meta.INEXACT_INTEGER)
        elif problem:
            v.add(field, problem)
        else:
            v.items.append(meta.far_too_large(field))
        return None
    struct = struct_pb2.Struct()
    try:
        struct.update(value)
    except (ValueError, TypeError, OverflowError) as exc:
        v.add(field, f"cannot be stored: {exc}")
        return None
    return meta.metadata(v, field, struct)


def _shape_problem(value: Any, limit: int) -> str | int | None:
    """What makes `value` unfit before it is converted: nested deeper than `limit` (the
    description), surely larger than meta.SIZE_BOUND as JSON ("": far_too_large), an integer
    a double cannot hold exactly (that int, which a Struct would round), or None.

    Iterative: a hostile body nested thousands deep must not exhaust the stack. Stops once
    a lower bound of the JSON bytes passes the bound: converting a million tiny values to
    learn the size held the event loop for seconds (meta.SIZE_BOUND).
    """
    bound = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return f"is nested more than {MAX_METADATA_DEPTH} levels of objects and arrays deep"
        if isinstance(item, dict | list):
            bound += 2 * max(len(item), 1)  # the brackets and a ", " between members
            if bound > meta.SIZE_BOUND:
                return ""  # before pushing a million members
            if isinstance(item, dict):
                bound += sum(len(key) + 4 for key in item)  # "key":_
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
        elif type(item) is str:
            bound += len(item) + 2
        else:
            bound += 1
            if type(item) is int and not -MAX_EXACT_INT <= item <= MAX_EXACT_INT:
                return item
        if bound > meta.SIZE_BOUND:
            return ""
    return None


def _path_to(value: JsonObject, target: int, root: str) -> str:
    """The path of `target` (compared by identity: the parser makes each big integer an
    object of its own) in `value`, whose path is `root`. Containers are expanded in
    _shape_problem's order, which found `target` before it passed its bound."""
    stack: list[tuple[Any, str]] = [(value, root)]
    while stack:
        item, path = stack.pop()
        members = item.items() if isinstance(item, dict) else enumerate(item)
        for name, child in members:
            where = f"{path}.{name}" if isinstance(item, dict) else f"{path}[{name}]"
            if child is target:
                return where
            if isinstance(child, dict | list):
                stack.append((child, where))
    return root
