"""Slide readers: one interface (``SlideReader``), adapters per library, ``open_slide`` routes.

Readers register themselves with ``@register_reader(priority)``; ``open_slide`` asks each, in
priority order, whether it detects the path (by content, not by name), and opens it with the
first that does. A reader that refuses the format (``UnsupportedFormatError``) passes the path
to the next one; any other error is the slide's and is raised as is.

    openslide  (10)  the vendor formats OpenSlide detects
    tiffslide  (20)  OME-TIFF and TIFFs OpenSlide refuses (strip, one-level, untiled)
    wsidicom   (30)  DICOM WSI sets OpenSlide refuses
    fastslide  (40)  Zeiss CZI and Olympus VSI (and, when preferred, what OpenSlide reads)

A reader can be preferred (``open_slide(path, prefer=...)`` or ``XMAG_READER_PREFER``): it is
tried first, on what its ``detect_preferred`` accepts (``detect`` unless widened); a refusal
falls back to the order above. Preferring fastslide trades identical pixels for speed
(see ``fastslide_reader``).

Each reader declares its ``formats``; ``supported_formats_sentence()`` lists them for messages,
CLI help and docs, so no list of formats is kept by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

from xmag.errors import (
    CorruptSlideError,
    SlideNotFoundError,
    UnsupportedFormatError,
)
from xmag.readers import dicom_reader as _dicom_reader  # noqa: F401 - registers "wsidicom"
from xmag.readers import fastslide_reader as _fastslide_reader  # noqa: F401 - "fastslide"
from xmag.readers import openslide_reader as _openslide_reader  # noqa: F401 - "openslide"
from xmag.readers import tiff_reader as _tiff_reader  # noqa: F401 - registers "tiffslide"
from xmag.readers._prefer import reader_order as _reader_order
from xmag.readers.base import (
    LevelInfo,
    MetadataMpp,
    SlideFormat,
    SlideReader,
    registered_readers,
    supported_formats_sentence,
)

__all__ = [
    "LevelInfo",
    "MetadataMpp",
    "SlideFormat",
    "SlideReader",
    "open_slide",
    "registered_readers",
    "supported_formats_sentence",
]

# Formats people often try, recognised by their first bytes, for a message that says what it is.
_KNOWN_OTHERS: tuple[tuple[bytes, str], ...] = (
    (b"ZISRAWFILE", "a Zeiss CZI file"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
)


def open_slide(path: str | os.PathLike[str], *, prefer: str | None = None) -> SlideReader:
    """Open a whole-slide image with the first registered reader that reads its format.

    Args:
        path: a slide file, a DICOM folder (one slide), or one .dcm file of such a folder,
            or a VSI file or the folder holding it.
        prefer: name of a registered reader to try first (default: ``XMAG_READER_PREFER``,
            else none); when it refuses the file, the registry order decides.

    Raises:
        SlideNotFoundError: nothing exists at ``path``.
        CorruptSlideError: the file is empty, or is a known format but damaged or truncated.
        UnsupportedFormatError: no registered reader reads it (PNG, text...).
        SettingsError: ``prefer`` (or ``XMAG_READER_PREFER``) names no registered reader.
    """
    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(f"{p} does not exist; check the path and the mount.", path=p)
    if p.is_file() and p.stat().st_size == 0:
        raise CorruptSlideError(
            f"{p} is empty (0 bytes); the copy or upload was interrupted: send the file again.",
            path=p,
        )
    refusals: list[str] = []
    for reader_cls, detect in _reader_order(prefer):
        if not detect(p):
            continue
        try:
            return reader_cls(p)
        except UnsupportedFormatError as exc:
            refusals.append(f"{reader_cls.name}: {exc.message}")
    raise UnsupportedFormatError(
        f"{p} is {_describe(p)}, which xmag cannot read; convert it to OME-TIFF (e.g. with "
        f"bfconvert) or a pyramidal tiled TIFF. {supported_formats_sentence()}",
        path=p,
        refusals=refusals,
    )


def _describe(path: Path) -> str:
    """A few words on what ``path`` seems to be, for the refusal message."""
    if path.is_dir():
        vsi = any(f.suffix.lower() == ".vsi" for f in path.iterdir())
        return "an Olympus VSI folder" if vsi else "a folder with no slide xmag recognises"
    if path.suffix.lower() == ".vsi":
        return "an Olympus VSI file"
    with path.open("rb") as fh:
        head = fh.read(16)
    return next((what for magic, what in _KNOWN_OTHERS if head.startswith(magic)), "not a slide")
