"""Stage 2a: the slide's level-0 microns per pixel, and where that number came from.

Order of trust: an explicit override, the file's metadata, the objective power (10 / power), a
default the caller states; otherwise ``UnknownMppError``. Every answer carries its source, so
results can say how they were made, and warnings for values that look wrong.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import field
from enum import StrEnum

from pydantic import ConfigDict, computed_field
from pydantic.dataclasses import dataclass

from xmag.errors import InvalidMppError, UnknownMppError
from xmag.readers.base import SlideReader

__all__ = ["MPP_PLAUSIBLE_UM", "MPP_XY_TOLERANCE", "MppInfo", "MppSource", "resolve_mpp"]

MPP_PLAUSIBLE_UM = (0.1, 20.0)  # um/px outside this range is flagged as implausible
MPP_XY_TOLERANCE = 0.05  # x and y differing by more than 5% is flagged
OBJECTIVE_UM_AT_1X = 10.0  # 10x objective ~ 1.0 um/px; 40x ~ 0.25


class MppSource(StrEnum):
    OVERRIDE = "override"
    METADATA = "metadata"
    OBJECTIVE_POWER = "objective_power"
    DEFAULT = "default"


# extra="ignore": result.json also holds ``mpp``, computed from x and y, never read back.
@dataclass(frozen=True, config=ConfigDict(extra="ignore"))
class MppInfo:
    """Level-0 microns per pixel with its provenance (also result.json's ``mpp``).

    Attributes:
        mpp_x, mpp_y: level-0 um/px along x and y.
        source: where they came from.
        detail: the metadata field, "objective power 20", the option, ...
        warnings: sentences for a person when the values look wrong.
    """

    mpp_x: float
    mpp_y: float
    source: MppSource
    detail: str
    warnings: tuple[str, ...] = field(default=())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def mpp(self) -> float:
        """The isotropic mpp used for tiling (mean of x and y)."""
        return (self.mpp_x + self.mpp_y) / 2.0


def _check_value(value: float | None, what: str, path: object) -> float | None:
    if value is None:
        return None
    # numbers.Real also admits numpy scalars; bool is a Real but never a resolution.
    valid = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not valid or not math.isfinite(value) or value <= 0:
        raise InvalidMppError(
            f"{what} of {value!r} um/px for {path} is not a positive number; give the level-0 "
            "microns per pixel, e.g. 0.25 for a 40x scan.",
            path=path,
            value=str(value),
        )
    return float(value)


def _warnings(mpp_x: float, mpp_y: float) -> tuple[str, ...]:
    out = []
    lo, hi = MPP_PLAUSIBLE_UM
    for axis, v in (("x", mpp_x), ("y", mpp_y)):
        if not lo <= v <= hi:
            out.append(f"implausible mpp {axis}={v:.4g} um/px (expected {lo}-{hi})")
    if abs(mpp_x - mpp_y) / max(mpp_x, mpp_y) > MPP_XY_TOLERANCE:
        out.append(f"anisotropic pixels: mpp x={mpp_x:.4g} and y={mpp_y:.4g} differ by over 5%")
    return tuple(out)


def resolve_mpp(
    reader: SlideReader, *, override: float | None = None, default: float | None = None
) -> MppInfo:
    """Resolve level-0 um/px for ``reader``.

    Args:
        override: um/px to use whatever the file says (source ``override``).
        default: um/px to assume only when neither metadata nor objective power gives one.

    Raises:
        InvalidMppError: override or default is not a positive finite number.
        UnknownMppError: the slide states no mpp and no default was given.
    """
    override = _check_value(override, "mpp override", reader.path)
    default = _check_value(default, "default mpp", reader.path)
    if override is not None:
        return MppInfo(
            override, override, MppSource.OVERRIDE, "caller override", _warnings(override, override)
        )
    meta = reader.metadata_mpp()
    if meta is not None and all(math.isfinite(v) and v > 0 for v in (meta.mpp_x, meta.mpp_y)):
        return MppInfo(
            meta.mpp_x,
            meta.mpp_y,
            MppSource.METADATA,
            meta.field,
            _warnings(meta.mpp_x, meta.mpp_y),
        )
    power = reader.objective_power()
    if power is not None and math.isfinite(power) and power > 0:
        v = OBJECTIVE_UM_AT_1X / power
        return MppInfo(
            v, v, MppSource.OBJECTIVE_POWER, f"objective power {power:g}", _warnings(v, v)
        )
    if default is not None:
        return MppInfo(
            default, default, MppSource.DEFAULT, "caller default", _warnings(default, default)
        )
    raise UnknownMppError(
        f"{reader.path} states no microns per pixel (no mpp metadata, no objective power). Pass an "
        "explicit mpp (--mpp / mpp_override) or allow a default (--default-mpp / default_mpp).",
        path=reader.path,
    )
