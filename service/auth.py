"""API keys and clients (tenants): keys stored as sha256 hashes in Redis, each owned by a client.

A key is sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. Only ``sha256(key)`` is
stored: keys are 256-bit random strings (``xmag_`` + 43 url-safe characters), so a fast hash is
enough (a slow KDF protects low-entropy passwords, which these are not).

Every key belongs to one *client* (a tenant: a lab, a hospital, an integration). A client sees and
acts on its own jobs, batches, slides and results only; another client's are answered 404, as if
they did not exist. Scopes: ``read``, ``submit`` and ``admin`` (sees every client's resources and
the audit log; implies the other two).

Keys are managed with ``xmag keys create|list|revoke|rotate`` (``service.keys_cli``). Every request
reads the key's record from Redis (no cache), so a revoked or expired key is refused at once.
``XMAG_API_KEYS`` stays for quick starts: entries ``KEY`` (read and submit), ``KEY:read``,
``KEY:admin``, each optionally ``@client`` (default client ``default``); configured keys must be
long random strings.

Each client has a webhook signing secret, generated with the client and shown once (``xmag keys
create`` prints it when it creates the client); clients without one (the default client) use
``XMAG_WEBHOOK_SECRET`` or the generated service-wide secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from service.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError

__all__ = [
    "DEFAULT_CLIENT",
    "ApiKeyStore",
    "KeyInfo",
    "Principal",
    "Scope",
    "generate_key",
    "hash_key",
    "parse_key_entry",
]

#: Configured keys shorter than this are refused: a short key can be guessed.
MIN_KEY_CHARS = 16
#: The client of XMAG_API_KEYS entries without ``@client`` and of the generated first key.
DEFAULT_CLIENT = "default"
_CLIENT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class Scope(StrEnum):
    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"


#: What a key gets when its scopes are not given.
DEFAULT_SCOPES = frozenset({Scope.READ, Scope.SUBMIT})


@dataclass(frozen=True)
class Principal:
    """Who made the request: the key's public id (first chars of its hash), client and scopes."""

    key_id: str
    client: str
    scopes: frozenset[Scope]

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    def require(self, scope: Scope) -> None:
        """Raise 403 unless the key has ``scope`` (``admin`` has every scope)."""
        if scope not in self.scopes and not self.is_admin:
            raise PermissionDeniedError(
                f"This API key has scopes {sorted(self.scopes)}; the operation needs '{scope}'. "
                "Use a key with that scope (`xmag keys create --scope ...`)."
            )

    def sees(self, owner: str) -> bool:
        """True when a resource owned by client ``owner`` is visible to this principal (a record
        from before clients existed, owner "", belongs to the default client)."""
        return self.is_admin or (owner or DEFAULT_CLIENT) == self.client


@dataclass(frozen=True)
class KeyInfo:
    """A stored key's public record (never the key itself)."""

    id: str
    client: str
    scopes: tuple[str, ...]
    created_ms: int
    expires_ms: int
    source: str
    name: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "client": self.client,
            "scopes": list(self.scopes),
            "created_ms": self.created_ms,
            "expires_ms": self.expires_ms,
            "source": self.source,
            "name": self.name,
        }


def hash_key(key: str) -> str:
    """sha256 hex of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    """A new random key (shown once, never stored)."""
    return "xmag_" + secrets.token_urlsafe(32)


def check_client_name(client: str) -> str:
    """A valid client name (lower-case letters, digits, ``_.-``; at most 63 characters).

    Raises:
        InvalidRequestError: for any other name.
    """
    if not _CLIENT_RE.match(client):
        raise InvalidRequestError(
            f"Client name {client!r} is not valid: use 1-63 lower-case letters, digits, '_', '.' "
            "or '-', starting with a letter or digit."
        )
    return client


def parse_scopes(text: str) -> frozenset[Scope]:
    """``read``, ``submit``, ``admin`` joined by ``+`` or ``,`` ("" means read and submit)."""
    names = [s for s in re.split(r"[+,]", text) if s]
    if not names:
        return DEFAULT_SCOPES
    try:
        return frozenset(Scope(s) for s in names)
    except ValueError as exc:
        raise ValueError(
            f"Unknown scope in {text!r}; scopes are {[s.value for s in Scope]}."
        ) from exc


def parse_key_entry(entry: str) -> tuple[str, frozenset[Scope], str]:
    """``KEY[:SCOPES][@CLIENT]`` -> (key, scopes, client); ``KEY`` alone is read+submit.

    Raises:
        ValueError: for short keys, unknown scopes or bad client names.
    """
    rest, _, client = entry.partition("@")
    key, _, scope = rest.partition(":")
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(
            f"An XMAG_API_KEYS entry is {len(key)} characters; use at least {MIN_KEY_CHARS} "
            "random characters (`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)."
        )
    client = client or DEFAULT_CLIENT
    if not _CLIENT_RE.match(client):
        raise ValueError(f"Client {client!r} in XMAG_API_KEYS is not a valid client name.")
    return key, parse_scopes(scope), client


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ApiKeyStore:
    """The hashed keys in ``{ns}:apikeys`` and the clients in ``{ns}:clients``.

    Layout::

        {ns}:apikeys   HASH  sha256(key) hex -> json {id, client, scopes, created_ms,
                             expires_ms (0: never), source (env|generated|cli), name}
        {ns}:clients   HASH  client -> json {name, created_ms, webhook_secret}
    """

    def __init__(self, client: redis.Redis, namespace: str = "xmag") -> None:
        self.r = client
        self.key = f"{namespace}:apikeys"
        self.clients_key = f"{namespace}:clients"

    # clients
    def ensure_client(self, client: str, *, with_secret: bool) -> str | None:
        """Create the client when new. Returns its new webhook secret (to show once) or None."""
        check_client_name(client)
        secret = ""
        if with_secret:
            secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        record = {"name": client, "created_ms": int(time.time() * 1000), "webhook_secret": secret}
        created = self.r.hsetnx(self.clients_key, client, json.dumps(record))
        return secret if created and secret else None

    def clients(self) -> dict[str, dict[str, Any]]:
        return {_s(k): json.loads(v) for k, v in self.r.hgetall(self.clients_key).items()}

    def webhook_secret(self, client: str) -> str | None:
        """The client's own webhook secret, or None (use the service-wide one)."""
        raw = self.r.hget(self.clients_key, client) if client else None
        if raw is None:
            return None
        return str(json.loads(raw).get("webhook_secret") or "") or None

    # keys
    def add(
        self,
        key: str,
        scopes: frozenset[Scope],
        *,
        source: str,
        client: str = DEFAULT_CLIENT,
        expires_ms: int = 0,
        name: str = "",
    ) -> KeyInfo:
        """Store a key's hash (idempotent). Returns its public record."""
        check_client_name(client)
        digest = hash_key(key)
        info = KeyInfo(
            id=digest[:12],
            client=client,
            scopes=tuple(sorted(s.value for s in scopes)),
            created_ms=int(time.time() * 1000),
            expires_ms=expires_ms,
            source=source,
            name=name,
        )
        self.r.hset(self.key, digest, json.dumps(info.as_dict()))
        return info

    def create(
        self,
        client: str,
        scopes: frozenset[Scope],
        *,
        expires_ms: int = 0,
        name: str = "",
    ) -> tuple[str, KeyInfo, str | None]:
        """A new key for ``client`` (created when new, with its webhook secret).

        Returns:
            (the key in clear, its record, the new client's webhook secret or None).
        """
        secret = self.ensure_client(client, with_secret=True)
        key = generate_key()
        return (
            key,
            self.add(key, scopes, source="cli", client=client, expires_ms=expires_ms, name=name),
            secret,
        )

    def all(self) -> list[KeyInfo]:
        infos = [self._info(raw) for raw in self.r.hgetall(self.key).values()]
        return sorted(infos, key=lambda i: (i.client, i.created_ms))

    def _find(self, key_id: str) -> tuple[str, KeyInfo] | None:
        for digest, raw in self.r.hgetall(self.key).items():
            if _s(digest).startswith(key_id) and len(key_id) >= 8:
                return _s(digest), self._info(raw)
        return None

    def revoke(self, key_id: str) -> KeyInfo | None:
        """Delete a key by its public id; effective for the next request. None when unknown."""
        found = self._find(key_id)
        if found is None:
            return None
        self.r.hdel(self.key, found[0])
        return found[1]

    def rotate(self, key_id: str) -> tuple[str, KeyInfo, KeyInfo] | None:
        """A new key with the old one's client, scopes and expiry; the old one is revoked.

        Returns:
            (the new key in clear, its record, the revoked record), or None when unknown.
        """
        found = self._find(key_id)
        if found is None:
            return None
        old = found[1]
        key = generate_key()
        info = self.add(
            key,
            frozenset(Scope(s) for s in old.scopes),
            source="cli",
            client=old.client,
            expires_ms=old.expires_ms,
            name=old.name,
        )
        self.r.hdel(self.key, found[0])
        return key, info, old

    @staticmethod
    def _info(raw: Any) -> KeyInfo:
        record = json.loads(raw)
        return KeyInfo(
            id=record["id"],
            client=record.get("client") or DEFAULT_CLIENT,
            scopes=tuple(record["scopes"]),
            created_ms=int(record.get("created_ms", 0)),
            expires_ms=int(record.get("expires_ms", 0)),
            source=record.get("source", ""),
            name=record.get("name", ""),
        )

    def sync_configured(self, entries: list[str]) -> None:
        """Make the configured keys (XMAG_API_KEYS) the only ``env`` keys; others stay."""
        wanted = {}
        for entry in entries:
            key, scopes, client = parse_key_entry(entry)
            wanted[hash_key(key)] = (key, scopes, client)
        for digest, raw in self.r.hgetall(self.key).items():
            if json.loads(raw).get("source") == "env" and _s(digest) not in wanted:
                self.r.hdel(self.key, digest)
        for key, scopes, client in wanted.values():
            self.ensure_client(client, with_secret=False)
            self.add(key, scopes, source="env", client=client)

    def ensure_one(self) -> str | None:
        """Create a key (every scope, default client) when none exists; returns it or None."""
        if self.r.hlen(self.key) > 0:
            return None
        key = generate_key()
        self.ensure_client(DEFAULT_CLIENT, with_secret=False)
        self.add(key, frozenset(Scope), source="generated")
        return key

    def authenticate(self, key: str | None) -> Principal:
        """The principal for a presented key (read from Redis on every call: no cache).

        Raises:
            AuthenticationError: when the key is missing, unknown, revoked or expired (401).
        """
        if not key:
            raise AuthenticationError(
                "This endpoint needs an API key: send `Authorization: Bearer <key>` or `X-API-Key`."
            )
        raw = self.r.hget(self.key, hash_key(key))
        if raw is None:
            raise AuthenticationError("The API key is not valid; check it or ask for a new one.")
        info = self._info(raw)
        if info.expires_ms and info.expires_ms <= int(time.time() * 1000):
            raise AuthenticationError("The API key has expired; ask for a new one.")
        return Principal(info.id, info.client, frozenset(Scope(s) for s in info.scopes))
