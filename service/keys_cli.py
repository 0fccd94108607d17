"""``xmag keys create|list|revoke|rotate``: API keys and their clients, managed on the server.

The command talks to the service's Redis (``REDIS_URL``, else the embedded Redis of a local
``xmag serve`` with the same ``--data-dir``). A new key is printed once (only its sha256 is kept);
so is a new client's webhook secret. ``revoke`` and ``rotate`` take effect for the next request:
the API reads keys from Redis on every request. Every change is written to the audit log.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["keys_app"]

keys_app = typer.Typer(help="Manage API keys and their clients.", no_args_is_help=True)

_DataDir = Annotated[Path | None, typer.Option(help="The service's data folder [XMAG_DATA_DIR].")]
_Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@contextlib.contextmanager
def _stores(data_dir: Path | None) -> Iterator[tuple[Any, Any]]:
    """(ApiKeyStore, AuditLog) on the service's Redis."""
    from service.audit import AuditLog, audit_path
    from service.auth import ApiKeyStore
    from service.errors import ServiceUnavailableError
    from service.queue import redis_client
    from service.settings import ServiceSettings

    overrides: dict[str, Any] = {"data_dir": data_dir} if data_dir is not None else {}
    settings = ServiceSettings(**overrides)
    url = settings.redis_url
    if not url:
        socket_path = settings.redis_dir / "redis.sock"
        if not socket_path.exists():
            raise ServiceUnavailableError(
                f"No REDIS_URL and no embedded Redis at {socket_path}; start `xmag serve` with "
                "this --data-dir first, or set REDIS_URL."
            )
        url = f"unix://{socket_path}"
    with contextlib.closing(redis_client(url)) as client:
        yield (
            ApiKeyStore(client, settings.namespace),
            AuditLog(client, settings.namespace, audit_path(settings.data_dir)),
        )


def _expires_ms(days: float | None, at: datetime | None) -> int:
    if at is not None:
        return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() * 1000)
    if days is not None:
        return int((time.time() + days * 86400) * 1000)
    return 0


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ms else "-"


@keys_app.command("create")
def create(
    client: Annotated[str, typer.Option(help="The client (tenant) the key acts for.")],
    scope: Annotated[
        list[str] | None,
        typer.Option(help="read, submit or admin; repeat for several (default: read, submit)."),
    ] = None,
    expires_in_days: Annotated[
        float | None, typer.Option(min=0, help="The key expires after this many days.")
    ] = None,
    expires_at: Annotated[
        datetime | None, typer.Option(help="The key expires at this time (UTC if no zone).")
    ] = None,
    name: Annotated[str, typer.Option(help="A label for the key (who holds it).")] = "",
    data_dir: _DataDir = None,
    json_out: _Json = False,
) -> None:
    """Create a key (and the client when new); prints the key once."""
    from service.auth import parse_scopes

    scopes = parse_scopes(",".join(scope or []))
    with _stores(data_dir) as (keys, audit):
        key, info, secret = keys.create(
            client, scopes, expires_ms=_expires_ms(expires_in_days, expires_at), name=name
        )
        audit.record(
            "key.create",
            client=client,
            key_id=info.id,
            source="cli",
            detail=f"scopes {'+'.join(info.scopes)}",
        )
    if json_out:
        typer.echo(json.dumps({"key": key, "webhook_secret": secret, **info.as_dict()}))
        return
    typer.echo(f"API key for client {client!r} (shown once, store it now): {key}")
    typer.echo(f"  id {info.id}, scopes {', '.join(info.scopes)}, expires {_when(info.expires_ms)}")
    if secret:
        typer.echo(f"Webhook secret of the new client {client!r} (shown once): {secret}")


@keys_app.command("list")
def list_keys(
    client: Annotated[str | None, typer.Option(help="Only this client's keys.")] = None,
    data_dir: _DataDir = None,
    json_out: _Json = False,
) -> None:
    """List keys (ids, clients, scopes, expiry; never the keys)."""
    with _stores(data_dir) as (keys, _):
        infos = [i for i in keys.all() if client is None or i.client == client]
    if json_out:
        typer.echo(json.dumps([i.as_dict() for i in infos]))
        return
    for i in infos:
        typer.echo(
            f"{i.id}  {i.client:<20} {'+'.join(i.scopes):<20} expires {_when(i.expires_ms):<20} "
            f"{i.source} {i.name}"
        )


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from `xmag keys list`).")],
    data_dir: _DataDir = None,
) -> None:
    """Revoke a key: refused from the next request on."""
    with _stores(data_dir) as (keys, audit):
        info = keys.revoke(key_id)
        if info is None:
            typer.echo(f"No key with id {key_id!r}; see `xmag keys list`.", err=True)
            raise typer.Exit(1)
        audit.record("key.revoke", client=info.client, key_id=info.id, source="cli")
    typer.echo(f"Revoked key {info.id} of client {info.client!r}.")


@keys_app.command("rotate")
def rotate(
    key_id: Annotated[str, typer.Argument(help="The key's id (from `xmag keys list`).")],
    data_dir: _DataDir = None,
    json_out: _Json = False,
) -> None:
    """Replace a key by a new one (same client, scopes and expiry); the old one stops at once."""
    with _stores(data_dir) as (keys, audit):
        rotated = keys.rotate(key_id)
        if rotated is None:
            typer.echo(f"No key with id {key_id!r}; see `xmag keys list`.", err=True)
            raise typer.Exit(1)
        key, info, old = rotated
        audit.record(
            "key.rotate",
            client=info.client,
            key_id=info.id,
            source="cli",
            detail=f"replaces {old.id}",
        )
    if json_out:
        typer.echo(json.dumps({"key": key, "replaces": old.id, **info.as_dict()}))
        return
    typer.echo(f"New key for client {info.client!r} (shown once): {key}")
    typer.echo(f"  id {info.id}; key {old.id} is revoked.")
