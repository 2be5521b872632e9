"""The lines of the JSON Lines files `memstore import` and `memstore restore` read."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

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
