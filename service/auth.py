"""API keys: stored as sha256 hashes in Redis, with ``read`` and ``submit`` scopes.

A key is sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. Only ``sha256(key)`` is
stored: keys are 256-bit random strings (``xmag_`` + 43 url-safe characters), so a fast hash is
enough (a slow KDF protects low-entropy passwords, which these are not). ``XMAG_API_KEYS`` entries
are ``KEY`` (every scope) or ``KEY:read`` (read-only); configured keys must be long random strings.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum

import redis

from service.errors import AuthenticationError, PermissionDeniedError

__all__ = ["ApiKeyStore", "Principal", "Scope", "generate_key", "hash_key", "parse_key_entry"]

#: Configured keys shorter than this are refused: a short key can be guessed.
MIN_KEY_CHARS = 16


class Scope(StrEnum):
    READ = "read"
    SUBMIT = "submit"


@dataclass(frozen=True)
class Principal:
    """Who made the request: the key's public id (first chars of its hash) and its scopes."""

    key_id: str
    scopes: frozenset[Scope]

    def require(self, scope: Scope) -> None:
        """Raise 403 unless the key has ``scope``."""
        if scope not in self.scopes:
            raise PermissionDeniedError(
                f"This API key has scopes {sorted(self.scopes)}; the operation needs '{scope}'. "
                "Use a key with that scope (keys configured without ':read' have every scope)."
            )


def hash_key(key: str) -> str:
    """sha256 hex of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    """A new random key (shown once, never stored)."""
    return "xmag_" + secrets.token_urlsafe(32)


def parse_key_entry(entry: str) -> tuple[str, frozenset[Scope]]:
    """``KEY`` -> every scope; ``KEY:read`` -> read-only.

    Raises:
        ValueError: for short keys or unknown scopes.
    """
    key, _, scope = entry.partition(":")
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(
            f"An XMAG_API_KEYS entry is {len(key)} characters; use at least {MIN_KEY_CHARS} "
            "random characters (`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)."
        )
    if scope in ("", "submit"):
        return key, frozenset(Scope)
    if scope == "read":
        return key, frozenset({Scope.READ})
    raise ValueError(f"Unknown scope {scope!r} in XMAG_API_KEYS; use KEY or KEY:read.")


class ApiKeyStore:
    """The hashed keys in ``{ns}:apikeys``."""

    def __init__(self, client: redis.Redis, namespace: str = "xmag") -> None:
        self.r = client
        self.key = f"{namespace}:apikeys"

    def add(self, key: str, scopes: frozenset[Scope], *, source: str) -> str:
        """Store a key's hash (idempotent). Returns its public id."""
        digest = hash_key(key)
        public_id = digest[:12]
        record = {
            "id": public_id,
            "scopes": sorted(s.value for s in scopes),
            "created_ms": int(time.time() * 1000),
            "source": source,
        }
        self.r.hset(self.key, digest, json.dumps(record))
        return public_id

    def sync_configured(self, entries: list[str]) -> None:
        """Make the configured keys (XMAG_API_KEYS) the only ``env`` keys; generated ones stay."""
        wanted = {}
        for entry in entries:
            key, scopes = parse_key_entry(entry)
            wanted[hash_key(key)] = scopes
        for digest, raw in self.r.hgetall(self.key).items():
            digest = digest.decode() if isinstance(digest, bytes) else digest
            if json.loads(raw).get("source") == "env" and digest not in wanted:
                self.r.hdel(self.key, digest)
        for entry in entries:
            key, scopes = parse_key_entry(entry)
            self.add(key, scopes, source="env")

    def ensure_one(self) -> str | None:
        """Create a key when none exists. Returns the new key in clear (to print once) or None."""
        if self.r.hlen(self.key) > 0:
            return None
        key = generate_key()
        self.add(key, frozenset(Scope), source="generated")
        return key

    def authenticate(self, key: str | None) -> Principal:
        """The principal for a presented key.

        Raises:
            AuthenticationError: when the key is missing or unknown (401).
        """
        if not key:
            raise AuthenticationError(
                "This endpoint needs an API key: send `Authorization: Bearer <key>` or `X-API-Key`."
            )
        raw = self.r.hget(self.key, hash_key(key))
        if raw is None:
            raise AuthenticationError("The API key is not valid; check it or ask for a new one.")
        record = json.loads(raw)
        return Principal(record["id"], frozenset(Scope(s) for s in record["scopes"]))
