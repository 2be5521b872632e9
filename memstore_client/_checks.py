"""What the client checks before it builds a request: argument types, and metadata that the
server would refuse or that protobuf could not carry exactly."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from .errors import ArgumentTypeError, FieldViolation, InvalidArgument

#: The server's nesting limit: levels of objects and arrays, the metadata object being 1.
MAX_METADATA_DEPTH = 32

#: The largest integer magnitude a protobuf Struct (whose numbers are doubles) holds exactly.
MAX_EXACT_INT = 2**53


def invalid(field: str, description: str, cls: type[InvalidArgument] = InvalidArgument) -> Any:
    """The client's own InvalidArgument (reason INVALID_ARGUMENT, as the server's), naming
    `field`; `cls` is ArgumentTypeError for a value of the wrong type."""
    return cls(
        f"{field}: {description}",
        reason="INVALID_ARGUMENT",
        field_violations=[FieldViolation(field, description)],
    )


def text(field: str, value: object, *, optional: bool = False) -> None:
    """An id or text argument must be a str (None too when `optional`).

    Raises:
        ArgumentTypeError: it is not (also a TypeError).
    """
    if isinstance(value, str) or (optional and value is None):
        return
    raise invalid(field, f"must be a str, not {type(value).__name__}", ArgumentTypeError)


def integer(field: str, value: object, bits: int = 32) -> None:
    """A count or size argument must be an int (not a bool) that an int32 field (or one of
    `bits`) can hold.

    Raises:
        ArgumentTypeError: it is not an int.
        InvalidArgument: it is outside the field's range.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(field, f"must be an int, not {type(value).__name__}", ArgumentTypeError)
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        raise invalid(field, f"{value} does not fit in {bits} bits")


def real(field: str, value: object, *, optional: bool = False) -> None:
    """A fraction such as mmr_lambda must be an int or a float (not a bool; None too when
    `optional`): protobuf refused a str with its own bare "must be real number". The server
    checks the range, and names the field as this does.

    Raises:
        ArgumentTypeError: it is not a number.
    """
    if (optional and value is None) or (
        isinstance(value, int | float) and not isinstance(value, bool)
    ):
        return
    raise invalid(field, f"must be a number, not {type(value).__name__}", ArgumentTypeError)


def flag(field: str, value: object) -> None:
    """A yes-or-no argument must be a bool: protobuf refused "yes" with its own bare
    TypeError, and would have read any int as yes or no.

    Raises:
        ArgumentTypeError: it is not a bool.
    """
    if not isinstance(value, bool):
        raise invalid(field, f"must be a bool, not {type(value).__name__}", ArgumentTypeError)


def choice(field: str, value: object, choices: Collection[str]) -> None:
    """A name from a fixed set (search_type, a role type) must be a str, one of `choices`,
    which the message lists: a typo is a value the server would never see.

    Raises:
        ArgumentTypeError: it is not a str.
        InvalidArgument: it is not one of `choices`.
    """
    text(field, value)
    if value not in choices:
        raise invalid(field, f"must be one of {', '.join(choices)}, not {value!r}")


def texts(field: str, values: Iterable[object] | None) -> None:
    """Each item of a list argument of ids must be a str."""
    if isinstance(values, str):
        raise invalid(field, "must be a list of str, not a str", ArgumentTypeError)
    for i, value in enumerate(values or ()):
        text(f"{field}[{i}]", value)


def instance(field: str, value: object, kinds: type | tuple[type, ...]) -> None:
    """A row (a Message, a User, ...) must be an instance of `kinds`: another value failed
    later in Python's words, an AttributeError naming no argument.

    Raises:
        ArgumentTypeError: it is not.
    """
    if not isinstance(value, kinds):
        raise invalid(
            field, f"must be a {_names(kinds)}, not {type(value).__name__}", ArgumentTypeError
        )


def rows(field: str, values: object, kinds: type | tuple[type, ...]) -> list[Any]:
    """The items of a list argument of rows (messages to add, a restore's users, ...), each
    an instance of `kinds`, as a list.

    A str, bytes or a dict is refused whole, not iterated: its characters or keys failed
    later as rows, in Python's words ("argument after ** must be a mapping") and naming
    nothing.

    Raises:
        ArgumentTypeError: `values` is not a list, or an item is not one of `kinds`.
    """
    if isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable):
        raise invalid(
            field,
            f"must be a list of {_names(kinds)}, not {type(values).__name__}",
            ArgumentTypeError,
        )
    items = list(values)
    for i, item in enumerate(items):
        instance(f"{field}[{i}]", item, kinds)
    return items


def _names(kinds: type | tuple[type, ...]) -> str:
    return " or ".join(kind.__name__ for kind in (kinds if isinstance(kinds, tuple) else (kinds,)))


def json_object(field: str, value: object) -> None:
    """Metadata: a dict of JSON values at most 32 levels deep, integers within ±2**53.

    Raises:
        ArgumentTypeError: a value (or key) JSON cannot hold.
        InvalidArgument: too deep, an integer protobuf cannot carry exactly, NaN or Infinity.
    """
    if not isinstance(value, dict):
        raise invalid(field, f"must be a dict, not {type(value).__name__}", ArgumentTypeError)
    _check_dict(field, field, value, 1)


def _check_dict(root: str, path: str, value: dict[Any, Any], level: int) -> None:
    for key, item in value.items():
        if not isinstance(key, str):
            raise invalid(path, f"key {key!r} is not a str", ArgumentTypeError)
        _check_value(root, f"{path}.{key}", item, level)


def _check_value(root: str, path: str, value: object, level: int) -> None:
    """`value` sits in a container at `level`; a container value is one level deeper."""
    if isinstance(value, dict | list | tuple) and level >= MAX_METADATA_DEPTH:
        # Named by the argument, as the server names the field (also a cycle ends here).
        raise invalid(
            root,
            f"is nested more than {MAX_METADATA_DEPTH} levels of objects and arrays deep "
            f"(at {path[:200]})",
        )
    if isinstance(value, dict):
        _check_dict(root, path, value, level + 1)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(root, f"{path}[{i}]", item, level + 1)
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        return
    elif isinstance(value, int):
        if abs(value) > MAX_EXACT_INT:
            raise invalid(
                path,
                f"{value} is beyond ±2**53, which a protobuf Struct (numbers are doubles) "
                "cannot hold exactly; send it as a str, or as a float if rounding is fine",
            )
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise invalid(path, "is NaN or Infinity, which JSON cannot hold")
    else:
        raise invalid(
            path,
            f"is a {type(value).__name__}, which JSON cannot hold (use str, int, float, bool, "
            "None, dict or list)",
            ArgumentTypeError,
        )
