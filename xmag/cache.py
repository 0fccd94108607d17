"""A content-addressed result cache: same slide bytes, model and parameters -> stored result.

    key = sha256(canonical JSON of {slide sha256, model file checksums, encoder variant,
                 tiling parameters, slide options, xmag code version, cache format})

    <root>/<key[:2]>/<key>/   result.json, features.h5, heatmap.png, tiles.geojson

A hit copies the stored files into the caller's folder and returns the stored result without
opening the slide or running a model; changing any input of the key misses. Entries are written
to a temporary folder under ``<root>/.tmp`` and renamed into place, so a reader never sees half an
entry, and two processes storing the same key keep one (same content by construction).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from xmag.outputs._atomic import atomic_write

__all__ = ["CACHE_FORMAT", "ResultCache", "cache_key", "slide_sha256"]

CACHE_FORMAT = 1  # bump when the stored files or the key's inputs change meaning
_HASH_CHUNK = 1 << 22  # 4 MiB per read when hashing slides
_ENTRY_FILES = ("features.h5", "heatmap.png", "tiles.geojson", "result.json")  # result last


def _slide_files(path: Path) -> list[Path]:
    """The files whose bytes make up a slide: itself, or a folder's files in name order."""
    if path.is_dir():
        return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.as_posix())
    return [path]


def slide_sha256(path: str | Path) -> tuple[str, int]:
    """sha256 and total size in bytes of a slide file, or of a folder's files in name order.

    For a folder (a DICOM set) each file's relative name is hashed before its bytes, so moving
    bytes from one file to another changes the hash.
    """
    root = Path(path)
    h = hashlib.sha256()
    total = 0
    for f in _slide_files(root):
        if root.is_dir():
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
                total += len(chunk)
    return h.hexdigest(), total


def cache_key(
    *,
    slide_sha256: str,
    model_checksums: dict[str, str],
    params: dict[str, Any],
    options: dict[str, Any],
    code_version: str,
    variant: str | None = None,
) -> str:
    """Hex sha256 naming a result by everything that determines it."""
    identity = {
        "cache_format": CACHE_FORMAT,
        "slide_sha256": slide_sha256,
        "model": dict(sorted(model_checksums.items())),
        "variant": variant,
        "params": params,
        "options": options,
        "code_version": code_version,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResultCache:
    """Result folders by key under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lookup(self, key: str) -> Path | None:
        """The entry folder when complete (its result.json exists), else None."""
        entry = self.entry(key)
        return entry if (entry / "result.json").is_file() else None

    def restore(self, key: str, out_dir: str | Path) -> Path | None:
        """Copy a stored entry's files into ``out_dir`` (each atomically, result.json last).

        Returns ``out_dir/result.json``, or None on a miss.
        """
        entry = self.lookup(key)
        if entry is None:
            return None
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in _ENTRY_FILES:
            src = entry / name
            if src.is_file():
                with atomic_write(out / name) as tmp:
                    shutil.copyfile(src, tmp)
        return out / "result.json"

    def store(self, key: str, src_dir: str | Path, names: Iterable[str] = _ENTRY_FILES) -> Path:
        """Copy a finished result folder into the cache under ``key``; returns the entry."""
        final = self.entry(key)
        if self.lookup(key) is not None:
            return final
        staging = self.root / ".tmp" / f"{key}.{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            for name in names:
                src = Path(src_dir) / name
                if src.is_file():
                    shutil.copyfile(src, staging / name)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, final)
            except OSError:
                if self.lookup(key) is None:  # anything but "another process stored it first"
                    raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(staging)
        return final
