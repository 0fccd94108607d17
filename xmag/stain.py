"""Colour of stained slides: optical density, stain deconvolution, inks, and a modality guess.

Brightfield slides (H&E, IHC) show stain as light absorbed on a bright background; fluorescence
slides show signal as light emitted on a dark background. ``guess_modality`` tells them apart from a
low-resolution RGB image (a thumbnail) so a caller can refuse a slide its model was not trained on:

* fluorescence: most pixels of the image are dark (``DARK_MAX_RGB``);
* H&E vs IHC: colour deconvolution of the stained pixels with the Ruifrok-Johnston
  hematoxylin / eosin / DAB vectors (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001). H&E
  tissue absorbs green beyond what hematoxylin and DAB explain (eosin), so most of its stained
  pixels get a positive eosin concentration; an IHC slide (hematoxylin counterstain plus DAB, no
  eosin) gets almost none.

The pixel-level helpers (optical density, saturation, ink) are shared with ``xmag.tissue``.

``background_colour`` estimates the glass colour of a bright-field image and ``colour_doubt``
says when it is implausible: glass is near-white and almost neutral on every scanner, so a
background far from that means the pixels decode to the wrong colours (YCbCr decoded as RGB,
a wrong photometric interpretation or ICC profile), and tissue detection, stain guess and model
all see wrong colours. YCbCr decoded as RGB has a signature: glass (Y high, Cb and Cr near 128)
turns into a bright red channel over two mid-grey ones.
"""

from __future__ import annotations

import math
from enum import StrEnum

import numpy as np

__all__ = [
    "DARK_MAX_RGB",
    "EOSIN_FRACTION_HE",
    "FLUORESCENCE_DARK_FRACTION",
    "HED_STAIN_VECTORS",
    "STAINED_MIN_OD",
    "Modality",
    "background_colour",
    "channel_max",
    "channel_min",
    "colour_doubt",
    "guess_modality",
    "ink_colour",
    "mean_optical_density",
    "optical_density",
    "saturation",
    "stain_concentrations",
    "stained_pixels",
]

# Ruifrok & Johnston (2001) optical-density vectors (R, G, B), rows: hematoxylin, eosin, DAB.
HED_STAIN_VECTORS = np.array(
    [[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]], dtype=np.float64
)
STAINED_MIN_OD = 0.15  # mean OD (log10) above which a bright-field pixel counts as stained
DARK_MAX_RGB = 60  # a pixel whose brightest channel is below this is "dark" (fluorescence bg)
FLUORESCENCE_DARK_FRACTION = 0.5  # share of dark pixels from which an image is fluorescence
EOSIN_FRACTION_HE = 0.5  # share of stained pixels with eosin > 0 from which a slide is H&E
MIN_STAINED_PIXELS = 50  # fewer stained pixels than this cannot tell H&E from IHC
MAX_SAMPLED_PIXELS = 262_144  # the guess is a statistic: a regular subsample this size is plenty
# Inks: no histological stain is green; blue ink is far more saturated than hematoxylin; black
# ink is dark and neutral where dark DAB or hematoxylin stays coloured. Hue in OpenCV units (0-180).
INK_GREEN_HUE = (35, 95)  # ~70-190 degrees: green and teal markers
INK_GREEN_MIN_SATURATION = 0.25
INK_BLUE_HUE = (95, 135)  # ~190-270 degrees
INK_BLUE_MIN_SATURATION = 0.6
INK_BLACK_MAX_RGB = 45
# Glass: every channel at least this bright, and channels at most this far apart (grey levels).
GLASS_MIN_RGB = 170
GLASS_MAX_SPREAD = 40
BACKGROUND_SAMPLE_FRACTION = 0.05  # brightest share of the non-tissue pixels taken as glass
YCBCR_CHROMA_TOLERANCE = 28  # |G - 128|, |B - 128| at most this: chroma of glass read as RGB
INK_BLACK_MAX_SATURATION = 0.35

_HED_UNIT = HED_STAIN_VECTORS / np.linalg.norm(HED_STAIN_VECTORS, axis=1, keepdims=True)
_HED_INVERSE = np.linalg.inv(_HED_UNIT)
_OD_LUT = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)
_OD_LUT_3 = np.ascontiguousarray(_OD_LUT.reshape(1, 256, 1).repeat(3, axis=2))
_THIRDS = np.full((1, 3), 1.0 / 3.0, dtype=np.float32)


class Modality(StrEnum):
    HE = "he"
    IHC = "ihc"
    FLUORESCENCE = "fluorescence"
    UNKNOWN = "unknown"


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-channel optical density, log10(I0 / I) with I0 = 256 and I = value + 1.

    Args:
        rgb: (..., 3) uint8 RGB.

    Returns:
        (..., 3) float32 OD, 0 for white, about 2.4 for black.
    """
    return _OD_LUT[rgb]


def channel_max(rgb: np.ndarray) -> np.ndarray:
    """(...) brightest channel of (..., 3) uint8 RGB (faster than ``max(axis=-1)`` on uint8)."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def channel_min(rgb: np.ndarray) -> np.ndarray:
    """(...) darkest channel of (..., 3) uint8 RGB."""
    return np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def mean_optical_density(rgb: np.ndarray) -> np.ndarray:
    """(...) float32 mean of the three channels' optical density."""
    if rgb.ndim == 3 and rgb.shape[-1] == 3 and rgb.dtype == np.uint8 and rgb.size:
        import cv2

        # One table lookup and one weighted sum in OpenCV: no float temporaries per channel.
        od = cv2.LUT(np.ascontiguousarray(rgb), _OD_LUT_3)
        return np.asarray(cv2.transform(od, _THIRDS)).reshape(rgb.shape[:2])
    return (_OD_LUT[rgb[..., 0]] + _OD_LUT[rgb[..., 1]] + _OD_LUT[rgb[..., 2]]) / np.float32(3)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max in [0, 1] of (..., 3) uint8 RGB; 0 for black."""
    mx = channel_max(rgb).astype(np.float32)
    mn = channel_min(rgb).astype(np.float32)
    return (mx - mn) / np.maximum(mx, np.float32(1))


def stain_concentrations(od: np.ndarray) -> np.ndarray:
    """Hematoxylin, eosin and DAB concentrations (..., 3) of optical densities (..., 3).

    Solves OD = c @ HED (unit stain vectors) exactly; concentrations may be negative where a
    pixel's colour lies outside the cone of the three stains (e.g. no eosin at all).
    """
    return (od.reshape(-1, 3).astype(np.float64) @ _HED_INVERSE).reshape(od.shape)


def ink_colour(rgb: np.ndarray) -> np.ndarray:
    """(h, w) bool: pixels coloured like green, blue or black marker ink, (h, w, 3) uint8 RGB.

    Colour alone also flags the densest nuclei at high resolution (dark DAB, deep hematoxylin);
    ``xmag.tissue`` keeps only strokes wider than a nucleus.
    """
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2HSV)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    # Saturation s/255 against a fraction t is s >= ceil(255 t) (or s <= floor(255 t)) on the
    # integers: the same pixels, without a float image.
    green_s = math.ceil(255 * INK_GREEN_MIN_SATURATION - 1e-9)
    blue_s = math.ceil(255 * INK_BLUE_MIN_SATURATION - 1e-9)
    black_s = math.floor(255 * INK_BLACK_MAX_SATURATION + 1e-9)
    green = cv2.inRange(hsv, (INK_GREEN_HUE[0], green_s, 0), (INK_GREEN_HUE[1] - 1, 255, 255))
    blue = cv2.inRange(hsv, (INK_BLUE_HUE[0], blue_s, 0), (INK_BLUE_HUE[1] - 1, 255, 255))
    black = cv2.inRange(hsv, (0, 0, 0), (255, black_s, INK_BLACK_MAX_RGB - 1))
    del hue, sat, val
    return np.asarray(cv2.bitwise_or(cv2.bitwise_or(green, blue), black)).astype(bool)


def stained_pixels(rgb: np.ndarray) -> np.ndarray:
    """(h, w) bool: bright-field pixels that absorb light (mean OD above ``STAINED_MIN_OD``).

    Dark pixels (fluorescence background, black ink) are excluded: they carry no stain colour.
    """
    return (mean_optical_density(rgb) > STAINED_MIN_OD) & (channel_max(rgb) >= DARK_MAX_RGB)


def guess_modality(
    thumbnail: np.ndarray, mask: np.ndarray | None = None
) -> tuple[Modality, dict[str, float]]:
    """Guess whether a slide is H&E, IHC or fluorescence from a low-resolution RGB image.

    Args:
        thumbnail: (h, w, 3) uint8 RGB image of the whole slide.
        mask: optional (h, w) bool tissue mask. H&E vs IHC is decided on the stained pixels inside
            it; when it holds too few (an empty mask, a tiny fragment), on every stained pixel of
            the image, so a slide with almost no tissue still gets a guess.

    Returns:
        (modality, scores) with scores in [0, 1]: ``dark_fraction`` (share of dark pixels),
        ``stained_fraction`` (share of stained pixels in the image), ``eosin_fraction`` (share of
        the stained pixels analysed with a positive eosin concentration), and ``he``, ``ihc``,
        ``fluorescence`` (the evidence for each; the guess is the one that passes its threshold).
        UNKNOWN when a bright-field image has fewer than ``MIN_STAINED_PIXELS`` stained pixels.
    """
    if thumbnail.ndim != 3 or thumbnail.shape[-1] != 3 or thumbnail.size == 0:
        raise ValueError(
            f"thumbnail must be a non-empty (h, w, 3) RGB array, got {thumbnail.shape}"
        )
    if mask is not None and mask.shape != thumbnail.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from thumbnail {thumbnail.shape[:2]}")
    # A regular subsample keeps the guess fast on 2048 px thumbnails without changing its answer.
    step = max(
        1, math.ceil(math.sqrt(thumbnail.shape[0] * thumbnail.shape[1] / MAX_SAMPLED_PIXELS))
    )
    thumbnail = thumbnail[::step, ::step]
    mask = mask[::step, ::step] if mask is not None else None
    dark_fraction = float((channel_max(thumbnail) < DARK_MAX_RGB).mean())
    stained = stained_pixels(thumbnail)
    scores = {
        "dark_fraction": dark_fraction,
        "stained_fraction": float(stained.mean()),
        "eosin_fraction": 0.0,
        "fluorescence": dark_fraction,
        "he": 0.0,
        "ihc": 0.0,
    }
    if dark_fraction >= FLUORESCENCE_DARK_FRACTION:
        return Modality.FLUORESCENCE, scores
    chosen = stained & mask if mask is not None else stained
    if mask is None or int(chosen.sum()) < MIN_STAINED_PIXELS:
        # No tissue mask to trust: keep the stained pixels that are not coloured like ink.
        chosen = stained & ~ink_colour(thumbnail)
    if int(chosen.sum()) < MIN_STAINED_PIXELS:
        return Modality.UNKNOWN, scores
    conc = stain_concentrations(optical_density(thumbnail[chosen]))
    eosin_fraction = float((conc[:, 1] > 0).mean())
    scores["eosin_fraction"] = eosin_fraction
    scores["he"] = eosin_fraction * (1.0 - dark_fraction)
    scores["ihc"] = (1.0 - eosin_fraction) * (1.0 - dark_fraction)
    modality = Modality.HE if eosin_fraction >= EOSIN_FRACTION_HE else Modality.IHC
    return modality, scores


def background_colour(thumbnail: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray | None:
    """Median RGB of the glass of a bright-field image: the brightest ``BACKGROUND_SAMPLE_FRACTION``
    of the pixels outside ``mask`` (of all pixels when the mask leaves too few), by luma.

    Returns:
        (3,) float64 RGB, or None for an empty image.
    """
    if thumbnail.size == 0:
        return None
    step = max(
        1, math.ceil(math.sqrt(thumbnail.shape[0] * thumbnail.shape[1] / MAX_SAMPLED_PIXELS))
    )
    pixels = thumbnail[::step, ::step].reshape(-1, 3)
    if mask is not None and mask.shape == thumbnail.shape[:2]:
        outside = pixels[~mask[::step, ::step].reshape(-1)]
        if outside.shape[0] >= max(MIN_STAINED_PIXELS, pixels.shape[0] // 50):
            pixels = outside
    luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    n = max(1, int(pixels.shape[0] * BACKGROUND_SAMPLE_FRACTION))
    brightest = pixels[np.argpartition(-luma, n - 1)[:n]]
    return np.median(brightest, axis=0).astype(np.float64)


def colour_doubt(background: np.ndarray | None) -> str | None:
    """A sentence when a bright-field background colour is implausible for glass, else None."""
    if background is None:
        return None
    lo, hi = float(background.min()), float(background.max())
    if lo >= GLASS_MIN_RGB and hi - lo <= GLASS_MAX_SPREAD:
        return None
    r, g, b = (round(float(c)) for c in background)
    ycbcr = (
        r >= GLASS_MIN_RGB
        and abs(g - 128) <= YCBCR_CHROMA_TOLERANCE
        and abs(b - 128) <= YCBCR_CHROMA_TOLERANCE
    )
    cause = (
        "it looks like YCbCr pixels decoded as RGB (a wrong photometric interpretation)"
        if ycbcr
        else "the colours are probably decoded wrongly (photometric interpretation or ICC "
        "profile) or the slide is not bright-field"
    )
    return (
        f"the background (glass) decodes as RGB ({r}, {g}, {b}), far from near-white: {cause}; "
        "tissue detection and predictions see wrong colours: re-export the slide with correct "
        "colour metadata"
    )
