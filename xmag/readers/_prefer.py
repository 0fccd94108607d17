"""Which reader opens a slide first: ``open_slide(path, prefer=...)`` or ``XMAG_READER_PREFER``.

The preferred reader is tried before the registry order, on what its ``detect_preferred``
accepts (``detect`` unless the reader widens it; fastslide: also the formats OpenSlide reads). If it
refuses the file (``UnsupportedFormatError``) the registry order decides as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from xmag.errors import SettingsError
from xmag.readers.base import SlideReader, registered_readers
from xmag.settings import register_settings

__all__ = ["ReaderSettings", "reader_order"]

DetectFn = Callable[[Path], bool]


@register_settings
class ReaderSettings(BaseSettings):
    """Reader choice from ``XMAG_READER_*`` variables; read each time a slide is opened."""

    model_config = SettingsConfigDict(env_prefix="XMAG_READER_", extra="ignore")

    prefer: str | None = Field(
        default=None,
        description="registered reader tried first (e.g. fastslide); unset: the registry order",
    )


def reader_order(prefer: str | None) -> list[tuple[type[SlideReader], DetectFn]]:
    """Readers to try, each with its detect check: the preferred one first, then the registry.

    Args:
        prefer: a registered reader's name; None reads ``XMAG_READER_PREFER``; "" prefers none.

    Raises:
        SettingsError: the name is not a registered reader.
    """
    order: list[tuple[type[SlideReader], DetectFn]] = [
        (cls, cls.detect) for cls in registered_readers()
    ]
    name = prefer if prefer is not None else ReaderSettings().prefer
    if not name or not name.strip():
        return order
    by_name = {cls.name: cls for cls in registered_readers()}
    chosen = by_name.get(name.strip().lower())
    if chosen is None:
        raise SettingsError(
            f"the preferred reader {name!r} is not a registered reader; choose one of "
            f"{', '.join(sorted(by_name))}, or unset XMAG_READER_PREFER.",
            prefer=name,
        )
    return [(chosen, chosen.detect_preferred), *((cls, d) for cls, d in order if cls is not chosen)]
