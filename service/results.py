"""The results store: one folder per content key, holding result.json and the artifacts.

The engine writes into ``<store>/.staging/<job>.<attempt>/``; on success the folder is renamed to
``<store>/<key[:2]>/<key>/`` where the key is the sha256 of what determines the result (slide
sha256, model, tiling parameters, options, code and schema versions, as recorded in result.json:
the same identity the engine's own cache key is built from). The rename is
atomic, so a reader never sees half a result, and a second worker finishing the same content keeps
the first folder (same bytes) and drops its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["ARTIFACTS", "ResultsStore", "content_key"]

#: Downloadable files of a result and their media types.
ARTIFACTS: dict[str, str] = {
    "result.json": "application/json",
    "features.h5": "application/x-hdf5",
    "heatmap.png": "image/png",
    "tiles.geojson": "application/geo+json",
}

# What determines a result (``xmag.results.SlideResult``): the slide's bytes, the model (name,
# version, variant, checksums of every file), the tiling parameters, the per-slide options, the
# code and schema versions. Everything else in result.json (where the slide was read, when, how
# fast, on which provider, whether the engine's own cache answered) varies between identical runs.
_IDENTITY_FIELDS = ("model", "params", "options", "code_version", "schema_version")


def content_key(result: dict[str, Any]) -> str:
    """sha256 over what determines a result.json: slide sha256, model, parameters, versions.

    Raises:
        KeyError: ``result`` lacks the slide's sha256 or one of the identity fields (it is not
            a result.json written by the engine).
    """
    identity = {k: result[k] for k in _IDENTITY_FIELDS}
    identity["slide_sha256"] = result["slide"]["sha256"]
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResultsStore:
    """Folders of results by content key under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def staging_dir(self, job_id: str, attempt: int) -> Path:
        return self.root / ".staging" / f"{job_id}.{attempt}"

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def publish(self, staging: Path) -> str:
        """Move a finished staging folder into the store. Returns its content key."""
        result = json.loads((staging / "result.json").read_text())
        key = content_key(result)
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(staging, ignore_errors=True)
            return key
        try:
            os.rename(staging, final)
        except OSError:
            if not final.exists():  # anything but "another worker published it first"
                raise
            shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            fd = os.open(final.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return key

    def artifact(self, key: str, name: str) -> Path | None:
        """The path of one artifact of a result, or None."""
        if name not in ARTIFACTS or not key:
            return None
        path = self.path(key) / name
        return path if path.is_file() else None
