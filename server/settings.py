"""How a setting is declared, and read from flags (argparse) and environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")

# Which commands read a setting. A command offers flags for, and reads the environment of,
# only the settings it reads: `memstore keys` has no --port, and a bad MEMSTORE_PORT
# cannot break it.
SERVE = ("serve",)
PURGE = ("serve", "purge")
#: Everything that runs the embedding model.
EMBED = ("serve", "embed", "reindex")
#: Everything that opens the connection pool.
STORE = ("serve", "migrate", "purge", "recount", "embed", "reindex")
ANY = (*STORE, "projects", "keys")

_METADATA_KEY = "memstore.setting"
# Where add_arguments notes, in the parsed namespace, which settings its command reads.
_READ = "_settings_read"
# The field (set_by_env()) where build() keeps the names of the settings the environment set.
_BY_ENV = "set_by_env"


class ConfigError(ValueError):
    """An environment variable holds a value its setting cannot take."""


@dataclass(frozen=True, slots=True)
class Setting:
    """How one configuration field is set from the command line and the environment."""

    env: str
    help: str
    #: Text (a flag's or a variable's) to the field's value; ValueError says what is wrong.
    parse: Callable[[str], Any]
    commands: tuple[str, ...]
    #: "" derives the flag from the field name; None: environment only (secrets stay off `ps`).
    flag: str | None
    #: The default as --help and the README state it.
    shown: str
    #: The flag's value in --help; None names it after what the parser reads.
    metavar: str | None


def setting(
    default: _T,
    help: str,
    *,
    env: str,
    parse: Callable[[str], Any],
    commands: tuple[str, ...] = SERVE,
    flag: str | None = "",
    shown: str | None = None,
    metavar: str | None = None,
) -> _T:
    """A dataclass field with `default` that carries its Setting."""
    declared = Setting(
        env, help, parse, commands, flag, _show(default) if shown is None else shown, metavar
    )
    return field(default=default, metadata={_METADATA_KEY: declared})


def _show(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# -- parsers: each takes a flag's or a variable's text --------------------------------------


def parse_bool(text: str) -> bool:
    """1/true/yes/on or 0/false/no/off, in any case: the one boolean parser of memstore."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (1/true/yes/on or 0/false/no/off)")


def parse_int(text: str) -> int:
    """A whole number."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def parse_positive(text: str) -> int:
    """A whole number of at least 1."""
    value = parse_int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return value


def parse_count(text: str) -> int:
    """A whole number of at least 0."""
    value = parse_int(text)
    if value < 0:
        raise ValueError(f"must not be negative, not {value}")
    return value


#: A browser's Origin: scheme://host[:port], with no path (not even "/", which none matches).
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s,]+")


#: Ports a browser leaves out of an Origin, by scheme.
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def parse_origins(text: str) -> tuple[str, ...]:
    """Comma-separated browser origins (`https://app.example.com`), or `*` for any; each as
    a browser sends it (scheme and host in lowercase, no default port), since the Origin
    header is compared whole: `https://App.example.com:443` was taken and never matched."""
    origins = tuple(o.strip() for o in text.split(",") if o.strip())
    if origins == ("*",):
        return origins
    sent: list[str] = []
    for origin in origins:
        if _ORIGIN.fullmatch(origin) is None:
            raise ValueError(
                f"{origin!r} is not an origin: scheme://host[:port], no path (or * alone)"
            )
        scheme, _, host = origin.lower().partition("://")
        default = _DEFAULT_PORTS.get(scheme)
        if default is not None:
            host = host.removesuffix(default)
        sent.append(f"{scheme}://{host}")
    return tuple(sent)


def parse_port(text: str) -> int:
    """A TCP port, 0 to 65535 (0: the system picks one). Past it, binding raised
    OverflowError, a traceback; a negative one was "Servname not supported"."""
    value = parse_int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be 0 to 65535, not {value}")
    return value


def _parse_finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def parse_seconds(text: str) -> float:
    """A finite number (of seconds) of at least 0: a negative wait or period was taken, and
    meant a pool timeout that failed every call or a grace period of none."""
    value = _parse_finite(text)
    if value < 0:
        raise ValueError(f"must not be negative, not {text}")
    return value


def parse_positive_seconds(text: str) -> float:
    """A finite number of seconds above 0: a wait of none (--pool-timeout 0) failed every
    call. A negative one is told this bound (parse_seconds' "must not be negative" suggested
    that 0 would do)."""
    value = _parse_finite(text)
    if value <= 0:
        raise ValueError(f"must be more than 0, not {text}")
    return value


def parse_url(text: str) -> str:
    """A database URL: not empty. libpq reads "" as "every default" (the local socket, the
    OS user's database), so `--database-url ""` migrated a database nobody named."""
    if not text.strip():
        raise ValueError(
            "is empty: leave it out (and DATABASE_URL unset) for the embedded PostgreSQL"
        )
    return text


def seconds_up_to(most: int, unit: str = "seconds") -> Callable[[str], float]:
    """parse_seconds refusing a number above `most` (said in `unit`)."""

    def parse(text: str) -> float:
        value = parse_seconds(text)
        if value > most:
            raise ValueError(f"must be at most {most} {unit}, not {text}")
        return value

    return parse


_METAVARS: dict[Callable[[str], Any], str] = {
    parse_int: "N",
    parse_positive: "N",
    parse_count: "N",
    parse_port: "PORT",
    parse_seconds: "SECONDS",
    Path: "FILE",
}


# -- from the declaration to argparse and back ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Declared:
    """One Setting with the name of the field it sets."""

    name: str
    default: Any
    setting: Setting

    @property
    def flag(self) -> str | None:
        """The command-line flag; None when only the environment sets it."""
        if self.setting.flag == "":
            return "--" + self.name.replace("_", "-")
        return self.setting.flag

    def describe(self) -> str:
        """Its help text with the default and the environment variable."""
        return f"{self.setting.help} (default {self.setting.shown}; env {self.setting.env})"


def declared(cls: type[Any]) -> Iterator[Declared]:
    """The settings of dataclass `cls` and of the dataclasses nested in it, in order."""
    for f in dataclasses.fields(cls):
        if _METADATA_KEY in f.metadata:
            yield Declared(f.name, f.default, f.metadata[_METADATA_KEY])
        elif dataclasses.is_dataclass(f.default_factory):
            yield from declared(f.default_factory)


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any], command: str) -> None:
    """Adds the flags of `cls` that `command` reads, documented with defaults and variables."""
    read = [d for d in declared(cls) if command in d.setting.commands]
    parser.set_defaults(**{_READ: frozenset(d.name for d in read)})
    for one in read:
        if one.flag is not None:
            _add_flag(parser, one)
    environment_only = [d for d in read if d.flag is None]
    if environment_only:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = "environment only:\n" + "\n".join(
            f"  {d.setting.env}  {d.setting.help} (default {d.setting.shown})"
            for d in environment_only
        )


def _add_flag(parser: argparse.ArgumentParser, one: Declared) -> None:
    assert one.flag is not None
    help_text = one.describe().replace("%", "%%")
    # SUPPRESS: an absent flag leaves no attribute, so build() can tell "not given" (the
    # environment decides) from any value given.
    if one.setting.parse is parse_bool:
        parser.add_argument(
            one.flag,
            dest=one.name,
            action=argparse.BooleanOptionalAction,
            default=argparse.SUPPRESS,
            help=help_text,
        )
        return
    parser.add_argument(
        one.flag,
        dest=one.name,
        type=_flag_type(one.setting.parse),
        default=argparse.SUPPRESS,
        metavar=one.setting.metavar or _METAVARS.get(one.setting.parse),
        help=help_text,
    )


def _flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def set_by_env() -> frozenset[str]:
    """The field `set_by_env` of a settings dataclass (not a setting itself): build() fills it
    with the names of the settings its environment variables set, for source()."""
    return field(default=frozenset(), compare=False, repr=False)


def source(config: Any, name: str) -> str:
    """What set `config`'s setting `name`, for an error about its value: its environment
    variable when that set it (or when it has no flag), else its flag (for a default too: the
    flag is what changes it). Errors named the flag when the variable had set the value."""
    for f in dataclasses.fields(config):
        if f.name == name:
            flag = Declared(name, f.default, f.metadata[_METADATA_KEY]).flag
            if flag is None or name in getattr(config, _BY_ENV):
                return str(f.metadata[_METADATA_KEY].env)
            return flag
    raise KeyError(name)


def build(cls: type[_T], args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> _T:
    """A `cls` from parsed flags: a flag wins, then its environment variable, then the default.

    Only the settings the parsed command reads are set; the others keep their defaults.

    Raises:
        ConfigError: an environment variable holds a value its setting cannot take.
    """
    read: frozenset[str] = getattr(args, _READ, frozenset())
    return _build(cls, args, os.environ if environ is None else environ, read)


def _build(
    cls: type[_T], args: argparse.Namespace, environ: Mapping[str, str], read: frozenset[str]
) -> _T:
    values: dict[str, Any] = {}
    by_env: set[str] = set()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        one: Setting | None = f.metadata.get(_METADATA_KEY)
        if one is None:
            if dataclasses.is_dataclass(f.default_factory):
                values[f.name] = _build(f.default_factory, args, environ, read)
            continue
        if f.name not in read:
            continue
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
            continue
        text = environ.get(one.env, "")
        if text == "":  # an empty variable counts as unset, as shells make them easily
            continue
        try:
            values[f.name] = one.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{one.env}: {exc}") from None
        by_env.add(f.name)
    if any(f.name == _BY_ENV for f in dataclasses.fields(cls)):  # type: ignore[arg-type]
        values[_BY_ENV] = frozenset(by_env)
    return cls(**values)
