"""The code version every result records: the release plus, in a git checkout, the commit."""

from __future__ import annotations

import functools
from pathlib import Path

from xmag import __version__

__all__ = ["code_version"]

_SHA_CHARS = 12


def _git_commit(repo: Path) -> str | None:
    """The checked-out commit of ``repo``, read from .git without running git (None if unknown)."""
    git = repo / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None  # detached HEAD holds the sha itself
        ref = head.removeprefix("ref: ")
        loose = git / ref
        if loose.exists():
            return loose.read_text().strip() or None
        for line in (git / "packed-refs").read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    except OSError:
        return None
    return None


@functools.cache
def code_version() -> str:
    """``0.1.0`` for an installed release, ``0.1.0+g<commit>`` when running from a git checkout.

    Part of the result cache key, so results computed by different code never collide.
    """
    sha = _git_commit(Path(__file__).resolve().parents[1])
    return f"{__version__}+g{sha[:_SHA_CHARS]}" if sha else __version__
