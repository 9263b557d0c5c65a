"""API key text: generate, parse, hash, verify.

A key reads `sk-my-<id>-<secret>`: `id` is 12 hex characters, not secret, the key's
primary key and the prefix it is looked up by (`modelyard keys list` shows it, `keys revoke`
takes it); `secret` is 32 random bytes, URL-safe base64. Only the SHA-256 of the whole key
is stored. A slow password hash buys nothing for 256 random bits and would cost
milliseconds on every request; the stored digest is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_PREFIX = "sk-my-"
ID_LENGTH = 12
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class NewKey:
    id: str
    text: str
    """The whole key, shown once."""
    digest: str


def new_key() -> NewKey:
    key_id = secrets.token_hex(ID_LENGTH // 2)
    text = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
    return NewKey(key_id, text, digest(text))


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def key_id_of(text: str) -> str | None:
    """The id inside a presented key, or None when it cannot be one of ours."""
    if not text.startswith(KEY_PREFIX):
        return None
    key_id = text[len(KEY_PREFIX):len(KEY_PREFIX) + ID_LENGTH]
    if len(key_id) != ID_LENGTH or not set(key_id) <= _HEX:
        return None
    if text[len(KEY_PREFIX) + ID_LENGTH:len(KEY_PREFIX) + ID_LENGTH + 1] != "-":
        return None
    return key_id


def matches(text: str, stored_digest: str) -> bool:
    """Whether a presented key is the one whose digest is stored, in constant time."""
    return hmac.compare_digest(digest(text).encode(), stored_digest.encode())


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if authorization is None or authorization[:7].lower() != "bearer ":
        return None
    token = authorization[7:].strip()
    return token or None
