"""The result store: one content-addressed folder per result identity, shared by the CLI and the
service's workers.

A result is named before any work is done, by everything that determines it
(``ResultIdentity``): the slide's sha256, the model package's file checksums and encoder variant,
the tiling parameters (the card's input merged with the caller's ``SlideOptions``), the code
version and this store's format. Everything else in result.json (where the slide was read, when,
how fast, on which provider) varies between identical runs and is not part of the key::

    key = sha256(canonical JSON of ResultIdentity)

    <root>/<key[:2]>/<key>/          result.json (written last), features.h5, heatmap.png,
                                     tiles.geojson
    <root>/.staging/<name>/          a result being written (one per job attempt or CLI call)

``lookup_or_embed`` is the one way through: look the key up, and only on a miss open the slide,
embed it into a staging folder and publish that folder with one atomic rename. A reader never
sees half a result; two processes finishing the same key keep the first folder (same content by
construction) and drop their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from xmag.digest import SlideDigest
from xmag.params import SlideOptions, TilingParams
from xmag.results import RESULT_FILES, SlideResult

if TYPE_CHECKING:
    from xmag.engine import Engine

__all__ = [
    "ARTIFACTS",
    "STORE_FORMAT",
    "ResultIdentity",
    "ResultStore",
    "StoredResult",
    "lookup_or_embed",
]

#: Bump when the stored files or the identity's fields change meaning.
STORE_FORMAT: Literal[2] = 2
#: Files of a stored result and their media types (result.json is written last).
ARTIFACTS: dict[str, str] = RESULT_FILES


class ResultIdentity(BaseModel):
    """Everything that determines a result; its ``key()`` names the result's folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store_format: Literal[2] = STORE_FORMAT
    slide_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    model: dict[str, str] = Field(description="sha256 of every package file by path")
    variant: str | None = Field(description="encoder variant (None: the card's default encoder)")
    params: TilingParams
    code_version: str

    def key(self) -> str:
        """Hex sha256 over the canonical JSON of the identity."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class ResultStore:
    """Folders of results by key under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lookup(self, key: str) -> Path | None:
        """The folder of a complete result (its result.json exists), else None."""
        folder = self.path(key)
        return folder if (folder / "result.json").is_file() else None

    def load(self, key: str) -> SlideResult | None:
        """The stored result.json, or None on a miss."""
        folder = self.lookup(key)
        if folder is None:
            return None
        return SlideResult.model_validate_json((folder / "result.json").read_text("utf-8"))

    def artifact(self, key: str, name: str) -> Path | None:
        """The path of one file of a stored result (a name from ``ARTIFACTS``), or None."""
        if name not in ARTIFACTS or not key:
            return None
        path = self.path(key) / name
        return path if path.is_file() else None

    def staging_dir(self, name: str | None = None) -> Path:
        """A fresh, empty folder to write a result into before ``publish``."""
        staging = self.root / ".staging" / (name or uuid.uuid4().hex)
        shutil.rmtree(staging, ignore_errors=True)  # a crashed attempt's leftovers
        staging.mkdir(parents=True)
        return staging

    def publish(self, staging: Path, key: str) -> Path:
        """Move a finished staging folder into the store under ``key``; returns the folder.

        Raises:
            FileNotFoundError: ``staging`` holds no result.json.
        """
        if not (staging / "result.json").is_file():
            raise FileNotFoundError(f"{staging} holds no result.json: nothing to publish")
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if self.lookup(key) is None:
            try:
                os.rename(staging, final)
            except OSError:
                if self.lookup(key) is None:  # anything but "another process published it first"
                    raise
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):  # the rename reaches the disk
            fd = os.open(final.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return final

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class StoredResult:
    """A result in the store.

    Attributes:
        key: its identity key.
        folder: its folder in the store.
        result: result.json as stored (the run that computed it: its timings, its provider).
        hit: True when it was found, not computed, by this call.
        seconds: wall time of this call.
    """

    key: str
    folder: Path
    result: SlideResult
    hit: bool
    seconds: float


def lookup_or_embed(
    engine: Engine,
    store: ResultStore,
    slide_path: Path,
    digest: SlideDigest,
    *,
    options: SlideOptions | None = None,
    staging_name: str | None = None,
    display_name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> StoredResult:
    """The stored result of this slide, model and options; computed and published on a miss.

    The key is computed from ``digest`` before the slide is opened: a hit opens nothing.

    Raises:
        XmagError: from the engine on a miss (typed input errors, cancellation, inference).
    """
    started = time.perf_counter()
    options = options or SlideOptions()
    key = engine.identity(digest.sha256, options).key()
    stored = store.load(key)
    if stored is not None:
        return StoredResult(key, store.path(key), stored, True, time.perf_counter() - started)
    staging = store.staging_dir(staging_name)
    try:
        result = engine.embed_slide(
            slide_path,
            staging,
            options=options,
            digest=digest,
            display_name=display_name,
            progress=progress,
            should_cancel=should_cancel,
        )
        folder = store.publish(staging, key)
    finally:
        store.discard(staging)
    return StoredResult(key, folder, result, False, time.perf_counter() - started)
