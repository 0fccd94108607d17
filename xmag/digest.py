"""A slide's content digest, computed once per file.

A result is named by the slide's bytes (``xmag.store.ResultIdentity``), so the sha256 of a slide
must be known before anything else: an upload knows it from the stream that wrote it (the service
keeps it with the slide and the job), and a slide named by path is hashed once and remembered by
``DigestCache`` under the file's *fingerprint*: device, inode, size and modification time in
nanoseconds (for a folder such as a DICOM set: the name and fingerprint of each file). A file
rewritten in place gets a new mtime (and usually size), so it misses and is hashed again; a file
touched without changing its bytes costs one more hash, never a wrong digest.

    <root>/<fp[:2]>/<fp>.json     {"sha256": ..., "size_bytes": ..., "fingerprint": [...]}

Entries are written atomically (a temporary file renamed into place), so processes sharing the
folder never read half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from xmag.outputs._atomic import atomic_write

__all__ = ["DigestCache", "SlideDigest", "slide_digest", "slide_files"]

_HASH_CHUNK = 1 << 22  # 4 MiB per read


@dataclass(frozen=True)
class SlideDigest:
    """sha256 (hex) of a slide's bytes and their total size in bytes."""

    sha256: str
    size_bytes: int


def slide_files(path: Path) -> list[Path]:
    """The files whose bytes make up a slide: itself, or a folder's files in name order."""
    if path.is_dir():
        return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.as_posix())
    return [path]


def slide_digest(path: str | os.PathLike[str]) -> SlideDigest:
    """Hash a slide file, or a folder's files in name order.

    For a folder each file's relative name is hashed before its bytes, so moving bytes from one
    file to another changes the digest.
    """
    root = Path(path)
    h = hashlib.sha256()
    total = 0
    for f in slide_files(root):
        if root.is_dir():
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
                total += len(chunk)
    return SlideDigest(h.hexdigest(), total)


def _fingerprint(path: Path) -> list[list[object]]:
    """(relative name, device, inode, size, mtime ns) of every file of the slide."""
    root = path.resolve()
    out: list[list[object]] = []
    for f in slide_files(root):
        st = f.stat()
        name = f.relative_to(root).as_posix() if root.is_dir() else ""
        out.append([name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns])
    return out


class DigestCache:
    """Slide digests remembered by file fingerprint under ``root``.

    Attributes:
        hashed: slides this object hashed (misses); ``reused``: digests it found stored.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.hashed = 0
        self.reused = 0

    def _entry(self, fingerprint: list[list[object]]) -> Path:
        key = hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()
        return self.root / key[:2] / f"{key}.json"

    def digest(self, path: str | os.PathLike[str]) -> SlideDigest:
        """The slide's digest: stored when its fingerprint is known, else hashed and stored."""
        fingerprint = _fingerprint(Path(path))
        entry = self._entry(fingerprint)
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
            if data.get("fingerprint") == fingerprint:
                self.reused += 1
                return SlideDigest(str(data["sha256"]), int(data["size_bytes"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a miss, or an unreadable entry: hash again and overwrite it
        digest = slide_digest(path)
        if _fingerprint(Path(path)) == fingerprint:  # unchanged while we read it
            entry.parent.mkdir(parents=True, exist_ok=True)
            record = {"sha256": digest.sha256, "size_bytes": digest.size_bytes}
            with atomic_write(entry) as tmp:
                tmp.write_text(json.dumps({**record, "fingerprint": fingerprint}), "utf-8")
        self.hashed += 1
        return digest
