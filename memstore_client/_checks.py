"""What the client checks before it builds a request: argument types, and metadata that the
server would refuse or that protobuf could not carry exactly."""

from __future__ import annotations

import math
from collections.abc import Iterable
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


def integer(field: str, value: object) -> None:
    """A count or size argument must be an int (not a bool) that an int32 field can hold.

    Raises:
        ArgumentTypeError: it is not an int.
        InvalidArgument: it is outside the int32 range.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(field, f"must be an int, not {type(value).__name__}", ArgumentTypeError)
    if not -(2**31) <= value < 2**31:
        raise invalid(field, f"{value} does not fit in 32 bits")


def texts(field: str, values: Iterable[object] | None) -> None:
    """Each item of a list argument of ids must be a str."""
    if isinstance(values, str):
        raise invalid(field, "must be a list of str, not a str", ArgumentTypeError)
    for i, value in enumerate(values or ()):
        text(f"{field}[{i}]", value)


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
