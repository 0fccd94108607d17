"""fastslide adapter: Zeiss CZI and Olympus VSI, which no other registered reader opens.

fastslide (PyPI ``fastslide==0.8.1``, a C++ reader) is the reader for **CZI** and **VSI** and for
nothing else by default: its ``detect`` claims only a CZI (``ZISRAWFILE`` magic) or a ``.vsi``
TIFF (or a folder holding one), and it is tried last (priority 40), after every reader that
might already read the file. It can read Aperio SVS and other OpenSlide formats too, but only
when chosen explicitly (``open_slide(path, prefer="fastslide")`` or ``XMAG_READER_PREFER``):

Decision, measured 2026-11-30 (``benchmarks/bench_fastslide.py --slide
.bench/decode/synthetic-40x-50000x37500-seed1.svs --regions 150 --rounds 3``: a generated 40x
Aperio slide, YCbCr 4:2:0 JPEG q80 tiles of 256 px, 448 px regions of level 1 (10x), fresh random
regions per round, A/B interleaved, on 2 cores shared with other jobs at load average 15-18, so
wall-clock figures are noisy; tiles per CPU-second of the process are the steadier figure, as
fastslide decodes the tiles of one read on its own thread pool):

    through xmag (open_slide(path, prefer=...)), median of 3 rounds:
        one caller thread:  OpenSlide 54.3 tiles/s (144 per CPU-s), fastslide 149.2 (406): x2.8
        two caller threads: OpenSlide 56.1 tiles/s (127 per CPU-s), fastslide 199.2 (349): x2.7
    the libraries alone: one thread x3.6 wall, x2.7 per CPU-s; two threads x8.0 wall (noisy),
        x2.7 per CPU-s (an earlier run at load 11: x6.5 and x4.0 wall)
    pixels vs OpenSlide, 50 regions per level: mean abs diff 1.95 / 1.57 / 1.80 (levels 0/1/2),
        max 51 / 35 / 31, 80-83 % of values differ. OpenSlide's pixels equal tifffile's
        libjpeg-turbo decode of the same tiles exactly; fastslide's differ from both (mean 1.6-1.9,
        max 33 per tile). On CMU-1-Small-Region.svs (RGB-tagged JPEG tiles) the difference is
        only rounding: mean 0.58, max 2.
    concurrent reads (4 threads x 256 reads of one handle) equal serial reads: yes

fastslide is faster (x2.7 per CPU) and thread-safe, but not pixel-equal on YCbCr 4:2:0 tiles,
which newer scanners write: up to 51 grey levels from libjpeg-turbo's decode, beyond the
tolerance we accept for swapping the reader under a model (mean <= 0.5, max <= 8: IDCT
rounding). So OpenSlide stays first for SVS and the other OpenSlide formats; fastslide is there
for whoever prefers speed over identical pixels, by choice (files a preferred fastslide reads
are not screened by the hostile-input checks the default readers went through).

CZI and VSI pixels are 16-bit fluorescence channels; ``read_region`` returns display RGB
(uint8), made honestly and the same way for every tile of a slide:

* Each channel is mapped linearly from its 0.5th to its 99.9th percentile (``DISPLAY_LOW_PCT``,
  ``DISPLAY_HIGH_PCT``) to 0-255, clipped. The percentiles are taken once, when the slide is
  opened, over the smallest level (read whole when it holds at most ``MAX_REFERENCE_PX``),
  ignoring mosaic areas no tile covers; a slide whose smallest level is larger uses its bit
  depth instead (0 to the dtype's maximum). 8-bit channels are taken as they are.
* Channels are then coloured by the colour the file gives each (VSI: C405 blue, C488 green) and
  added, clipped at 255; a 3-channel RGB image keeps its channels. fastslide 0.8.1 presents the
  test CZI's single Gray16 channel (EGFP) as three equal channels named Red, Green and Blue, so it
  shows as grey.
* CZI mosaics: fastslide 0.8.1 fills level-0 areas that no sub-block covers with 65535 (white),
  while the file's own pyramid sub-blocks, libCZI and Bio-Formats-style readers have 0 there. The
  adapter reads the sub-block directory itself and sets uncovered pixels to 0 before the mapping,
  so the background of a fluorescence mosaic stays dark for the fluorescence tissue detector.
  Where sub-blocks overlap, fastslide composes them on its thread pool, so which one lies on top
  changes from read to read (277 of 300 reads of one 224 x 160 region crossing an overlap
  differed, even from one thread). At level 0 the adapter redraws the overlap pixels itself, in
  directory order with the last on top, as libCZI and czifile do, from the sub-blocks decoded
  here (uncompressed or zstd0; ``xmag.czi-overlaps`` says when a file's compression leaves them
  as fastslide draws them). The test CZI's level 0 then equals slideio's and czifile's exactly.
  Above level 0 overlaps are left to fastslide: the test CZI's level 1 is one pyramid sub-block,
  but a CZI whose upper levels fastslide composes from several sub-blocks may still vary there.
* Threads: fastslide reads of one handle are thread-safe (4 threads x 256 reads of the SVS and
  the VSI equal serial reads), so no lock is taken.
* VSI stacks with several focal planes are read at the middle plane (``z_count // 2``); the test
  VSI has 11 planes and plane 0 is empty. The plane is recorded in ``properties``
  (``xmag.z-plane``), as is the display window (``xmag.display``).

Damaged input: fastslide opens a truncated CZI without complaint and returns its fill value where
the data is missing, so the adapter checks first that the CZI's directory and every sub-block it
lists lie inside the file (``CORRUPT_SLIDE`` otherwise). A VSI whose ``_<name>_`` folder of
``.ets`` files is missing or damaged is ``CORRUPT_SLIDE`` too. Truncated CZI and ETS files at a
range of lengths were opened and read in subprocesses without a crash.

fastslide is imported lazily: without it, CZI and VSI are refused (``UNSUPPORTED_FORMAT``, with
the install command) and everything else works.
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from xmag.errors import CorruptSlideError, UnsupportedFormatError
from xmag.readers.base import (
    LevelInfo,
    MetadataMpp,
    SlideFormat,
    SlideReader,
    read_in_window,
    register_reader,
)

__all__ = [
    "DISPLAY_HIGH_PCT",
    "DISPLAY_LOW_PCT",
    "FASTSLIDE_REQUIREMENT",
    "MAX_REFERENCE_PX",
    "FastslideReader",
]

FASTSLIDE_REQUIREMENT = "fastslide==0.8.1"
DISPLAY_LOW_PCT = 0.5  # percentile of a channel shown as black
DISPLAY_HIGH_PCT = 99.9  # percentile of a channel shown at full intensity
# Largest smallest-level read whole to take the display percentiles (px; 16 Mpx of 4 uint16
# channels is 128 MiB). Larger: the window is the bit depth.
MAX_REFERENCE_PX = 16 * 1024 * 1024
_CZI_MAGIC = b"ZISRAWFILE"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Formats fastslide names, and ours. fastslide opens more (SVS, NDPI, MRXS...), when preferred.
_FORMATS = {"czi": "czi", "olympus-vsi": "vsi", "aperio": "svs"}
_CZI = SlideFormat("Zeiss CZI", (".czi",))
_VSI = SlideFormat("Olympus VSI", (".vsi",), "with its _name_ folder of .ets files")
# fastslide raises RuntimeError (NotImplementedError included) for files it cannot open or read.
_FASTSLIDE_ERRORS = (RuntimeError, ValueError, OSError)


def _fastslide() -> ModuleType:
    """The fastslide module, imported on first use."""
    try:
        import fastslide
    except ImportError as exc:
        raise UnsupportedFormatError(
            f"reading Zeiss CZI and Olympus VSI needs the fastslide package, which is not "
            f"installed: pip install {FASTSLIDE_REQUIREMENT}",
            package=FASTSLIDE_REQUIREMENT,
        ) from exc
    return fastslide


@register_reader(priority=40)
class FastslideReader(SlideReader):
    """A slide opened with fastslide: a CZI file, a VSI file, or a folder holding one VSI file.

    When preferred explicitly it opens any file fastslide reads (``detect_preferred``).
    """

    name: ClassVar[str] = "fastslide"
    formats: ClassVar[tuple[SlideFormat, ...]] = (_CZI, _VSI)

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        target = _vsi_in(path) if path.is_dir() else path
        if target is None:
            raise UnsupportedFormatError(f"{path} holds no single .vsi file.", path=path)
        kind = _kind(target)
        entries: list[_Entry] = []
        if kind == "czi":
            entries = _check_czi(target, path)
        elif kind == "vsi":
            _check_vsi_folder(target, path)
        fs = _fastslide()
        try:
            self._slide: Any = fs.FastSlide.from_file_path(str(target))
        except _FASTSLIDE_ERRORS as exc:
            raise self._open_error(kind, exc) from exc
        try:
            self._describe(target, entries)
        except BaseException:
            self._slide.close()
            raise

    def _describe(self, target: Path, entries: list[_Entry]) -> None:
        """Levels, properties, CZI mosaic and display mapping of the opened slide."""
        fmt = str(self._slide.format).lower()
        self._format = _FORMATS.get(fmt, fmt)
        self._z = int(self._slide.z_count) // 2
        self._levels = tuple(
            LevelInfo(i, int(w), int(h), float(ds))
            for i, ((w, h), ds) in enumerate(
                zip(self._slide.level_dimensions, self._slide.level_downsamples, strict=True)
            )
        )
        self._properties = {f"fastslide.{k}": str(v) for k, v in self._slide.properties.items()}
        self._properties["xmag.z-plane"] = f"{self._z} of {self._slide.z_count}"
        self._mosaic = _CziMosaic.of(target, entries, self.dimensions)
        if self._format == "czi":
            self._properties["xmag.czi-overlaps"] = (
                self._mosaic.overlaps if self._mosaic is not None else "as fastslide draws them"
            )
        self._colours = _channel_colours(self._slide)
        self._window = self._display_window()
        lo, hi = self._window
        self._properties["xmag.display"] = (
            "as stored"
            if self._window_is_identity()
            else "per channel, linear "
            + ", ".join(f"{a:g}-{b:g}" for a, b in zip(lo.tolist(), hi.tolist(), strict=True))
        )

    @classmethod
    def detect(cls, path: Path) -> bool:
        if path.is_dir():
            return _vsi_in(path) is not None
        return path.is_file() and _kind(path) in ("czi", "vsi")

    @classmethod
    def detect_preferred(cls, path: Path) -> bool:
        """What fastslide opens when chosen explicitly: also the formats OpenSlide reads."""
        if cls.detect(path):
            return True
        try:
            return path.is_file() and bool(_fastslide().is_supported(str(path)))
        except UnsupportedFormatError:
            return False

    @property
    def vendor(self) -> str | None:
        return {"czi": "zeiss", "vsi": "olympus", "svs": "aperio"}.get(self._format, self._format)

    @property
    def format(self) -> str:
        return self._format

    def metadata_mpp(self) -> MetadataMpp | None:
        x, y = (float(v) for v in self._slide.mpp)
        if not (math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0):
            return None
        where = {"czi": "czi.Scaling", "vsi": "vsi.metadata"}.get(self._format, self._format)
        return MetadataMpp(x, y, f"{where} via fastslide")

    def objective_power(self) -> float | None:
        value = self._properties.get("fastslide.objective_magnification")
        try:
            power = float(value) if value is not None else 0.0
        except ValueError:
            return None
        return power if power > 0 else None

    def _read_region(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        def read(xy: tuple[int, int], wh: tuple[int, int]) -> np.ndarray:
            return self._display(self._raw(level, xy, wh, level0_xy, size))

        return read_in_window(level0_xy, self._levels[level], size, read)

    # -- internals ------------------------------------------------------------------------------
    def _raw(
        self,
        level: int,
        xy: tuple[int, int],
        wh: tuple[int, int],
        level0_xy: tuple[int, int],
        size: tuple[int, int],
    ) -> np.ndarray:
        """(h, w, channels) pixels as stored, level-native window; uncovered mosaic set to 0."""
        try:
            image = self._slide.read_region(xy, level, wh, z=self._z)
            if image.is_separate:
                image = image.to_interleaved()
            # Copy out of fastslide's buffer (numpy() is a view of memory the Image owns).
            raw = np.array(image.numpy(), copy=True)
        except _FASTSLIDE_ERRORS as exc:
            raise self._undecodable(
                level0_xy, level, size, str(exc).splitlines()[0], "the slide is damaged there."
            ) from exc
        if raw.ndim == 2:
            raw = raw[..., None]
        if self._mosaic is not None:
            self._mosaic.fix(raw, self._levels[level].downsample, xy)
        return raw

    def _display(self, raw: np.ndarray) -> np.ndarray:
        """Stored channels -> (h, w, 3) uint8 display RGB (see the module docstring)."""
        if raw.dtype == np.uint8 and self._colours is None:
            return raw[..., :3] if raw.shape[2] >= 3 else np.repeat(raw[..., :1], 3, axis=2)
        lo, hi = self._window
        scaled = (raw.astype(np.float32) - lo) * (255.0 / (hi - lo))
        np.clip(scaled, 0, 255, out=scaled)
        if self._colours is None:  # RGB as stored
            rgb = scaled[..., :3]
        else:
            rgb = np.tensordot(scaled, self._colours, axes=([2], [0]))
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

    def _display_window(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (low, high) stored values shown as 0 and 255."""
        channels = int(self._slide.num_channels)
        dtype = np.dtype(str(self._slide.dtype))
        full = float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0
        lo, hi = np.zeros(channels, np.float32), np.full(channels, full, np.float32)
        if dtype == np.uint8:
            return lo, hi
        smallest = self._levels[-1]
        if smallest.width * smallest.height > MAX_REFERENCE_PX:
            return lo, hi
        raw = self._raw(
            smallest.index,
            (0, 0),
            (smallest.width, smallest.height),
            (0, 0),
            (smallest.width, smallest.height),
        )
        covered = (
            self._mosaic.covered(smallest.downsample, (0, 0), raw.shape[1::-1])
            if self._mosaic is not None
            else np.ones(raw.shape[:2], dtype=bool)
        )
        values = raw[covered]
        if values.size == 0:
            return lo, hi
        lo = np.percentile(values, DISPLAY_LOW_PCT, axis=0).astype(np.float32)
        hi = np.percentile(values, DISPLAY_HIGH_PCT, axis=0).astype(np.float32)
        return lo, np.maximum(hi, lo + 1)

    def _window_is_identity(self) -> bool:
        lo, hi = self._window
        return bool(np.all(lo == 0) and np.all(hi == 255) and self._colours is None)

    def _open_error(
        self, kind: str | None, exc: BaseException
    ) -> UnsupportedFormatError | CorruptSlideError:
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if kind not in ("czi", "vsi"):  # preferred for a format it is not the reader of
            return UnsupportedFormatError(
                f"fastslide does not read {self.path}: {cause}", path=self.path
            )
        what = "Zeiss CZI" if kind == "czi" else "Olympus VSI"
        return CorruptSlideError(
            f"{self.path} is a {what} file but fastslide cannot open it ({cause}); the file is "
            "damaged or truncated: copy it again from the microscope"
            + (", with its _name_ folder of .ets files." if kind == "vsi" else "."),
            path=self.path,
            vendor=kind,
        )

    def _close(self) -> None:
        self._slide.close()


def _kind(path: Path) -> str | None:
    """ "czi" or "vsi" by content (and, for VSI, its name: a VSI is a TIFF), else None."""
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError:
        return None
    if head.startswith(_CZI_MAGIC):
        return "czi"
    if path.suffix.lower() == ".vsi" and head[:4] in _TIFF_MAGIC:
        return "vsi"
    return None


def _vsi_in(folder: Path) -> Path | None:
    """The one .vsi file directly inside ``folder``, or None (none, or several)."""
    try:
        found = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".vsi"]
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


def _check_vsi_folder(vsi: Path, shown: Path) -> None:
    """Refuse a VSI without its ``_<stem>_/stack*/*.ets`` pixel files beside it."""
    folder = vsi.parent / f"_{vsi.stem}_"
    if not any(folder.glob("stack*/*.ets")):
        raise CorruptSlideError(
            f"{vsi} is an Olympus VSI file, but its pixels are missing: they live in .ets files "
            f"in the folder {folder.name} beside it ({folder} has none); copy the .vsi together "
            "with that folder.",
            path=shown,
            missing=str(folder),
        )


# -- CZI sub-block directory ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    """One CZI directory entry: where its sub-block is, and its X/Y rectangle at level 0."""

    file_pos: int
    pixel_type: int  # 0 Gray8, 1 Gray16, 3 Bgr48, 2 Bgr24...
    compression: int  # 0 none, 5 zstd0, 6 zstd1, 4 JPEG XR...
    pyramid: int
    dims: dict[str, tuple[int, int, int]]  # name -> (start, size, stored size)
    entry_bytes: int  # size of the entry (32 + 20 per dimension)

    @property
    def rect(self) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) in the file's level-0 stage frame, or None without X and Y."""
        if "X" not in self.dims or "Y" not in self.dims:
            return None
        (x, w, _), (y, h, _) = self.dims["X"], self.dims["Y"]
        return (x, y, x + w, y + h)


_SEGMENT = struct.Struct("<16sqq")  # segment id, allocated size, used size
_SEGMENT_BYTES = 32


def _check_czi(path: Path, shown: Path) -> list[_Entry]:
    """Check that the CZI's directory and every sub-block it lists lie inside the file.

    Returns:
        The directory's entries, in the file's order.

    Raises:
        CorruptSlideError: the header, the directory or a sub-block is cut off or not a CZI
            segment (a truncated or damaged file).
    """

    def corrupt(why: str) -> CorruptSlideError:
        return CorruptSlideError(
            f"{shown} is a Zeiss CZI file but {why}; the file is damaged or truncated: copy it "
            "again from the microscope.",
            path=shown,
            vendor="czi",
        )

    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            header = fh.read(_SEGMENT_BYTES + 80)
            if len(header) < _SEGMENT_BYTES + 68:
                raise corrupt(f"its header is cut off ({size:,} bytes)")
            dir_pos = struct.unpack_from("<q", header, _SEGMENT_BYTES + 52)[0]
            if not 0 < dir_pos <= size - _SEGMENT_BYTES - 128:
                raise corrupt(f"its sub-block directory (at byte {dir_pos:,}) is outside the file")
            fh.seek(dir_pos)
            seg = fh.read(_SEGMENT_BYTES + 128)
            if not seg.startswith(b"ZISRAWDIRECTORY"):
                raise corrupt(f"no sub-block directory is at byte {dir_pos:,}")
            used = _SEGMENT.unpack_from(seg, 0)[2]
            count = struct.unpack_from("<i", seg, _SEGMENT_BYTES)[0]
            if dir_pos + _SEGMENT_BYTES + used > size or count < 0:
                raise corrupt("its sub-block directory is cut off")
            body = fh.read(used - 128)
            entries = _directory_entries(body, count)
            if entries is None:
                raise corrupt("its sub-block directory is cut off")
            for entry in entries:
                fh.seek(entry.file_pos)
                head = fh.read(_SEGMENT_BYTES)
                if len(head) < _SEGMENT_BYTES or not head.startswith(b"ZISRAWSUBBLOCK"):
                    raise corrupt(f"the sub-block at byte {entry.file_pos:,} is missing")
                if entry.file_pos + _SEGMENT_BYTES + _SEGMENT.unpack_from(head, 0)[2] > size:
                    raise corrupt(f"the sub-block at byte {entry.file_pos:,} is cut off")
    except (OSError, struct.error) as exc:
        raise corrupt(f"it cannot be read ({exc})") from exc
    return entries


def _directory_entries(body: bytes, count: int) -> list[_Entry] | None:
    """Parse ``count`` DV directory entries; None when ``body`` ends first."""
    entries, off = [], 0
    for _ in range(count):
        if off + 32 > len(body):
            return None
        pixel_type, file_pos, _, compression = struct.unpack_from("<iqii", body, off + 2)
        pyramid = body[off + 22]
        ndims = struct.unpack_from("<i", body, off + 28)[0]
        if ndims < 0 or off + 32 + 20 * ndims > len(body):
            return None
        dims = {}
        for k in range(ndims):
            name, start, sz, _, stored = struct.unpack_from("<4siifi", body, off + 32 + 20 * k)
            dims[name.rstrip(b"\0").decode("ascii", "replace")] = (start, sz, stored)
        entries.append(_Entry(file_pos, pixel_type, compression, pyramid, dims, 32 + 20 * ndims))
        off += 32 + 20 * ndims
    return entries


# Sub-block pixel types xmag decodes itself to redraw overlaps: numpy dtype and samples per pixel.
_CZI_PIXELS = {0: ("u1", 1), 1: ("<u2", 1), 2: ("u1", 3), 3: ("<u2", 3)}
# Compressions xmag decodes (others leave overlaps as fastslide draws them).
_CZI_DECODERS = {0: "none", 5: "zstd0"}
_CZI_CACHED_BLOCKS = 16  # decoded sub-blocks kept per slide (a 2048 px Gray16 block: 8 MiB)


class _CziMosaic:
    """The level-0 sub-blocks of a CZI mosaic, relative to its top-left (fastslide's frame).

    Two jobs: ``covered`` tells mosaic pixels no sub-block covers (fastslide fills them with the
    maximum value at level 0; they are set to 0), and ``fix`` redraws, at level 0, the pixels
    where sub-blocks overlap: fastslide composes sub-blocks on a thread pool, so which one ends
    on top of an overlap changes from read to read (277 of 300 reads of one region differed).
    They are redrawn in directory order, the last on top, as libCZI and czifile do, from the
    sub-blocks decoded here (uncompressed or zstd0; other compressions keep fastslide's pixels
    and say so in ``overlaps``).
    """

    def __init__(self, path: Path, entries: list[_Entry], rects: np.ndarray) -> None:
        self.path = path
        self.entries = entries
        self.rects = rects
        self._cache: dict[int, np.ndarray] = {}
        self._cache_lock = threading.Lock()
        decodable = all(
            e.compression in _CZI_DECODERS and e.pixel_type in _CZI_PIXELS for e in entries
        )
        channels = {e.dims.get("C", (0, 1, 1))[0] for e in entries}
        self.redraw = decodable and len(channels) == 1
        self.overlaps = (
            "redrawn in directory order (last on top)"
            if self.redraw
            else "as fastslide draws them (their order may vary between reads)"
        )

    def _block(self, entry: _Entry) -> np.ndarray:
        """A sub-block's pixels, decoded once (the last ``_CZI_CACHED_BLOCKS`` are kept)."""
        with self._cache_lock:
            block = self._cache.get(entry.file_pos)
        if block is None:
            block = _decode_subblock(self.path, entry)
            with self._cache_lock:
                if len(self._cache) >= _CZI_CACHED_BLOCKS:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[entry.file_pos] = block
        return block

    @classmethod
    def of(cls, path: Path, entries: list[_Entry], dims: tuple[int, int]) -> _CziMosaic | None:
        """The mosaic when its level-0 sub-blocks span exactly ``dims`` (fastslide's level-0
        size), else None (no mask rather than a misplaced one)."""
        level0 = [e for e in entries if e.pyramid == 0 and e.rect is not None]
        if not level0:
            return None
        rects = np.asarray([e.rect for e in level0], dtype=np.int64)
        rects[:, [0, 2]] -= rects[:, 0].min()
        rects[:, [1, 3]] -= rects[:, 1].min()
        if (int(rects[:, 2].max()), int(rects[:, 3].max())) != dims:
            return None
        return cls(path, level0, rects)

    def _level_rects(self, downsample: float) -> np.ndarray:
        # Level-native pixel p has its centre at level-0 (p + 0.5) * downsample.
        return np.ceil(self.rects / downsample - 0.5).astype(np.int64)

    def covered(self, downsample: float, xy: tuple[int, int], wh: tuple[int, int]) -> np.ndarray:
        """(h, w) mask of the level-native window whose pixel centres fall in a sub-block."""
        w, h = wh
        count = self._counts(self._level_rects(downsample), xy, wh)
        return count > 0 if count is not None else np.zeros((h, w), dtype=bool)

    @staticmethod
    def _counts(rects: np.ndarray, xy: tuple[int, int], wh: tuple[int, int]) -> np.ndarray:
        w, h = wh
        count = np.zeros((h, w), dtype=np.int32)
        for x0, y0, x1, y1 in rects:
            cx0, cx1 = max(x0 - xy[0], 0), min(x1 - xy[0], w)
            cy0, cy1 = max(y0 - xy[1], 0), min(y1 - xy[1], h)
            if cx1 > cx0 and cy1 > cy0:
                count[cy0:cy1, cx0:cx1] += 1
        return count

    def fix(self, raw: np.ndarray, downsample: float, xy: tuple[int, int]) -> None:
        """Set uncovered pixels of the window ``raw`` (top-left ``xy``) to 0; at level 0,
        redraw its overlaps in directory order."""
        h, w = raw.shape[:2]
        count = self._counts(self._level_rects(downsample), xy, (w, h))
        raw[count == 0] = 0
        if downsample != 1.0 or not self.redraw or not (count > 1).any():
            return
        overlap = count > 1
        for entry, (x0, y0, x1, y1) in zip(self.entries, self.rects, strict=True):
            cx0, cx1 = max(x0 - xy[0], 0), min(x1 - xy[0], w)
            cy0, cy1 = max(y0 - xy[1], 0), min(y1 - xy[1], h)
            if cx1 <= cx0 or cy1 <= cy0 or not overlap[cy0:cy1, cx0:cx1].any():
                continue
            block = self._block(entry)
            part = block[cy0 + xy[1] - y0 : cy1 + xy[1] - y0, cx0 + xy[0] - x0 : cx1 + xy[0] - x0]
            where = overlap[cy0:cy1, cx0:cx1]
            raw[cy0:cy1, cx0:cx1][where] = part[where][:, None] if part.ndim == 2 else part[where]


def _read_subblock(path: Path, file_pos: int, entry: _Entry) -> np.ndarray:
    """Read and decode the sub-block segment at ``file_pos`` (uncompressed or zstd0)."""
    data: bytes | bytearray
    dtype, samples = _CZI_PIXELS[entry.pixel_type]
    (_, w, sw), (_, h, sh) = entry.dims["X"], entry.dims["Y"]
    with open(path, "rb") as fh:
        fh.seek(file_pos + _SEGMENT_BYTES)
        meta_size, _, data_size = struct.unpack("<iiq", fh.read(16))
        fh.seek(file_pos + _SEGMENT_BYTES + max(256, 16 + entry.entry_bytes) + meta_size)
        data = fh.read(data_size)
    if entry.compression == 5:
        import imagecodecs

        data = imagecodecs.zstd_decode(data)
    pixels = np.frombuffer(data, dtype=dtype, count=sw * sh * samples).reshape(sh, sw, samples)
    if (sw, sh) != (w, h):
        raise ValueError(f"sub-block at byte {file_pos} is stored at {sw}x{sh}, not {w}x{h}")
    if samples == 3:
        return np.ascontiguousarray(pixels[..., ::-1])  # BGR -> RGB
    return pixels[..., 0]


def _decode_subblock(path: Path, entry: _Entry) -> np.ndarray:
    """A level-0 sub-block's pixels, (h, w) or (h, w, 3) RGB, decoded from the file."""
    try:
        return _read_subblock(path, entry.file_pos, entry)
    except (OSError, ValueError, struct.error, RuntimeError) as exc:
        raise CorruptSlideError(
            f"{path}: the CZI sub-block at byte {entry.file_pos:,} cannot be decoded ({exc}); "
            "the file is damaged: copy it again from the microscope.",
            path=path,
        ) from exc


def _channel_colours(slide: Any) -> np.ndarray | None:
    """(channels, 3) display colour of each channel in 0-1, or None for stored RGB."""
    n = int(slide.num_channels)
    fmt = str(
        getattr(slide.read_region((0, 0), len(slide.level_dimensions) - 1, (1, 1)), "format", "")
    )
    if n in (3, 4) and fmt.endswith(("RGB", "RGBA")):
        return None
    colours = []
    for meta in list(slide.channel_metadata)[:n]:
        c = tuple(meta.get("color", ())) if isinstance(meta, dict) else ()
        colours.append(c if len(c) == 3 and any(c) else (255, 255, 255))
    if len(colours) < n:
        colours += [(255, 255, 255)] * (n - len(colours))
    if n == 1:
        colours = [(255, 255, 255)]
    return np.asarray(colours, dtype=np.float32) / 255.0
