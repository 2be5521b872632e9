"""Reading a REST request: its JSON body and query values, each bad one named by its field.

The checks themselves are the gRPC API's (server/api/validation.py, metadata_checks.py):
metadata goes through the same Struct walk, so size, depth, NUL and number rules are
identical on both ports. What
JSON allows and a Struct cannot hold is refused here, naming its path: a key given twice in
one object (the last won, silently), an integer beyond +-2^53 (a double rounds it).
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
from server.rest.paths import path_value

T = TypeVar("T")

#: The largest integer a query value may hold: gRPC's int32, which the same fields are there.
MAX_QUERY_INT = 2**31 - 1
#: A \\uD800-\\uDFFF escape: JSON may spell a lone surrogate, which is no Unicode text.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: A whole number in a query value: an optional sign and ASCII digits.
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
#: Significant digits a query number may have to be read: int64's 19.
_MAX_QUERY_DIGITS = 19

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
                if _has_surrogate(key):
                    return path or "body"
                if type(child) is str:
                    if _has_surrogate(child):
                        return f"{path}.{key}" if path else key
                elif child and isinstance(child, dict | list):
                    stack.append((child, f"{path}.{key}" if path else key))
        else:
            for i, child in enumerate(item):
                if type(child) is str:
                    if _has_surrogate(child):
                        return f"{path}[{i}]"
                elif child and isinstance(child, dict | list):
                    stack.append((child, f"{path}[{i}]"))
    return None


def _has_surrogate(text: str) -> bool:
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


def query_value(request: Request, name: str) -> str | None:
    """A query parameter's one value; None when absent.

    Raises:
        InvalidArgument: the parameter is given more than once (`?limit=1&limit=2` was read
            as its last value, silently), naming it.
    """
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise InvalidArgument.field(name, f"is given {len(values)} times; give it once")
    return values[0] if values else None


def query_int(
    request: Request,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int = MAX_QUERY_INT,
    alias: str | None = None,
) -> int | None:
    """An integer query value; None when absent or empty (`?cursor=` means absent).

    Raises:
        InvalidArgument: not a whole number, below `minimum` or above `maximum` (by default
            2^31 - 1, as the int32 fields of gRPC), naming the parameter.
    """
    text = query_value(request, name)
    if alias is not None and (other := query_value(request, alias)):
        # Both given: one was silently dropped, whichever they said (an audit).
        if text:
            raise InvalidArgument.field(alias, f"is given beside {name}: give one of the two")
        text, name = other, alias
    if not text:
        return None
    # ASCII digits only: int() also reads "1_0", other scripts' digits and spaces around.
    if _WHOLE_NUMBER.fullmatch(text) is None:
        raise InvalidArgument.field(name, f"{text[:64]!r} is not a whole number")
    # Digits past int64's are out of every range here: not read, as int() refuses more
    # than 4300 of them, leading zeros included (a ValueError, which answered 500).
    digits = text.lstrip("+-").lstrip("0") or "0"
    if len(digits) > _MAX_QUERY_DIGITS:
        lowest = -maximum - 1 if minimum is None else minimum
        bound = f"at least {lowest}" if text[0] == "-" else f"at most {maximum}"
        raise InvalidArgument.field(name, f"must be {bound} (got {text[:64]})")
    number = -int(digits) if text[0] == "-" else int(digits)
    if minimum is not None and number < minimum:
        raise InvalidArgument.field(name, f"must be at least {minimum} (got {number})")
    if number > maximum:
        raise InvalidArgument.field(name, f"must be at most {maximum} (got {text[:64]})")
    return number


def query_bool(request: Request, name: str) -> bool | None:
    """A boolean query value of a Zep route: what Go's strconv.ParseBool reads (1, t, T,
    TRUE, true, True, 0, f, F, FALSE, false, False), in any case; None when absent or empty.

    Raises:
        InvalidArgument: any other text, naming the parameter.
    """
    text = query_value(request, name)
    if not text:
        return None
    lowered = text.lower()
    if lowered in ("true", "t", "1"):
        return True
    if lowered in ("false", "f", "0"):
        return False
    raise InvalidArgument.field(name, f"{text[:64]!r} is not true or false")


def path_id(request: Request, name: str) -> str:
    """An id from the path (already percent-decoded), checked as gRPC checks ids.

    Raises:
        InvalidArgument: the id breaks the id rules, naming it.
    """
    value = path_text(request, name)
    v = val.Violations()
    val.check_id(v, name, value)
    v.raise_if_any()
    return value


def path_text(request: Request, name: str) -> str:
    """A path parameter as the caller sent it, "/" (%2F) included (server/rest/paths.py:
    routing_path).

    Raises:
        InvalidArgument: its bytes are not UTF-8, naming it.
    """
    value = path_value(str(request.path_params[name]))
    if _has_surrogate(value):
        raise InvalidArgument.field(name, "is not valid UTF-8 once percent-decoded")
    return value
