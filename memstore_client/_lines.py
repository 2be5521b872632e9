"""The lines of the JSON Lines files `memstore import` and `memstore restore` read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO, Any

from .errors import InvalidArgument


def text_lines(source: IO[bytes], name: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of each line of `source`, decoded as UTF-8.

    Decoding line by line, rather than opening the file as text, lets a bad byte be named
    by its line (and stops there) instead of escaping as a UnicodeDecodeError traceback.

    Raises:
        InvalidArgument: a line is not UTF-8.
    """
    for number, raw in enumerate(source, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"{name} line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                f"column {exc.start + 1}); memstore reads the UTF-8 JSON Lines it writes"
            ) from None
        yield number, text


def json_value(text: str | bytes) -> Any:
    """`text` parsed as JSON; nesting too deep for Python's parser, which raises
    RecursionError (no ValueError) past about 1,000 levels, is refused as other bad JSON
    is, so that a hostile or damaged line is named by its line, not a traceback.

    Raises:
        ValueError: `text` is not JSON, or is nested too deeply to parse.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested more deeply than JSON Lines here may be") from None
