"""API key material: the key format, its salted hash, and the project/key domain objects."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from server.errors import InvalidArgument

#: Every key starts with this, so a leaked one is recognizable (secret scanners, logs).
KEY_PREFIX = "msk_"
#: msk_<12 hex: the public id>_<43 url-safe base64 chars: 256 random bits>.
_KEY_RE = re.compile(r"^(msk_[0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
#: Longer presented values are rejected without hashing or a database lookup.
MAX_KEY_LENGTH = 128
#: The fewest of a prefix's 12 hex digits that name a key to revoke (git's shortest
#: abbreviation): fewer would let a slip of the finger name a key.
MIN_PREFIX_DIGITS = 4
_PREFIX_START_RE = re.compile(rf"^msk_[0-9a-f]{{{MIN_PREFIX_DIGITS},12}}$")
_SALT_BYTES = 16


@dataclass(frozen=True, slots=True)
class Project:
    """A row of projects: one API key space owning its users, sessions and messages."""

    project_id: int
    name: str
    created_at: datetime
    live_keys: int = 0


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What may be shown of a key after its creation: never the secret."""

    prefix: str
    project: str
    label: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class StoredKey:
    """What authentication reads to check a presented key."""

    project_id: int
    salt: bytes
    digest: bytes
    revoked: bool


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly made key: the full text (shown once) and what the database keeps."""

    text: str
    prefix: str
    salt: bytes
    digest: bytes


def digest(salt: bytes, secret: str) -> bytes:
    """The stored form of a secret: HMAC-SHA256 keyed by the key's own random salt.

    The secret carries 256 random bits, so a fast keyed hash is enough: no dictionary or
    brute force reaches it, and the per-key salt makes equal digests across keys impossible.
    """
    return hmac.new(salt, secret.encode("ascii"), hashlib.sha256).digest()


def new_key() -> NewKey:
    """A random key: its public prefix, its secret, a fresh salt and the salted digest."""
    prefix = KEY_PREFIX + secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(_SALT_BYTES)
    return NewKey(f"{prefix}_{secret}", prefix, salt, digest(salt, secret))


def split_key(text: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key; None for anything else."""
    if len(text) > MAX_KEY_LENGTH:
        return None
    match = _KEY_RE.fullmatch(text)
    return (match.group(1), match.group(2)) if match else None


def prefix_start(text: str) -> str:
    """What `text` names of a key's public prefix: a whole key's prefix, or `text` itself when
    it is `msk_` and 4 to 12 of the hex digits that `memstore keys list` shows.

    Raises:
        InvalidArgument: `text` is neither (field `prefix`). The message never repeats it: it
            may be a whole key mistyped, its secret included.
    """
    parts = split_key(text)
    if parts:
        return parts[0]
    if len(text) <= MAX_KEY_LENGTH and _PREFIX_START_RE.fullmatch(text):
        return text
    raise InvalidArgument.field(
        "prefix",
        f"{KEY_PREFIX} and {MIN_PREFIX_DIGITS} to 12 hex digits, the start of a prefix as "
        "`keys list` shows it (or the whole key)",
    )


def matches(stored: StoredKey, secret: str) -> bool:
    """Whether `secret` is the stored key's secret, compared in constant time."""
    return hmac.compare_digest(digest(stored.salt, secret), stored.digest)
