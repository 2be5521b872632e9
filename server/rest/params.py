"""Reading a REST request's query and path values, each bad one named by its parameter."""

from __future__ import annotations

import re

from starlette.requests import Request

from server.api import validation as val
from server.errors import InvalidArgument
from server.rest.body import has_surrogate
from server.rest.paths import path_value

#: The largest integer a query value may hold: gRPC's int32, which the same fields are there.
MAX_QUERY_INT = 2**31 - 1
#: A whole number in a query value: an optional sign and ASCII digits.
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
#: Significant digits a query number may have to be read: int64's 19.
_MAX_QUERY_DIGITS = 19


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
    if has_surrogate(value):
        raise InvalidArgument.field(name, "is not valid UTF-8 once percent-decoded")
    return value
