"""Selective search on one image: OpenCV's implementation, deterministic, boxes in original pixels.

``selective_search(image, ...)``: OpenCV's selective search ([SS], ``cv2.ximgproc``) on one
uint8 RGB image -> float32 [R, 4] xyxy boxes in original pixels, as [RCNN] used it: resize to
500 px wide, "fast" mode, drop duplicates and boxes under 20 px a side. Its keyword arguments
are the fields of ``detect.common.config.ProposalConfig`` (``SETTINGS_KEYS``).

Determinism: OpenCV ranks regions with C ``rand()`` (``rank = rand() * level``), whose state
is process-wide and advances with every call, so the same image proposed twice in one process
comes back in two orders (and ``top_k`` keeps two different sets). ``selective_search`` seeds
libc's generator (``srand(1)``, glibc's start-up seed) right before each run, under a lock, so
the boxes depend only on the image and the settings. On a platform whose C library cannot be
reached through ctypes (Windows), the order may vary between runs.
"""

from __future__ import annotations

import ctypes
import threading

import cv2
import numpy as np

MODES = {  # our name -> OpenCV's switch
    "fast": "switchToSelectiveSearchFast",  # [RCNN]: 2 colour spaces x 3 k's x 2 strategies
    "quality": "switchToSelectiveSearchQuality",  # [SS] quality: 5 colour spaces x 5 k's x 4 strategies
    "single": "switchToSingleStrategy",  # one colour space, one k, one strategy
}
RESIZE_SIDES = ("width", "longer", "shorter")
SETTINGS_KEYS = ("mode", "resize", "resize_side", "min_size", "top_k")  # = ProposalConfig fields
MAX_ELONGATION = 4  # the resized longer side is at most 4 x resize (extreme aspect ratios)
RANK_SEED = 1  # srand() seed before each run; 1 is glibc's default, as in a fresh process

try:
    _srand = ctypes.CDLL(None).srand
except (OSError, AttributeError, TypeError):  # no C library reachable this way (Windows)
    _srand = None
_rand_lock = threading.Lock()  # rand() is process-wide: one selective search at a time per process


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------

def selective_search(image: np.ndarray, *, mode: str = "fast", resize: int = 500,
                     resize_side: str = "width", min_size: int = 20, top_k: int = 2000) -> np.ndarray:
    """Selective-search boxes of one image: float32 [R, 4] xyxy in pixels of ``image``.

    ``image`` is uint8 RGB [H, W, 3] (``detect.data.read_image``). It is resized so that
    ``resize_side`` ("width", "longer" or "shorter") is ``resize`` pixels ([RCNN]: width 500;
    0 = no resize), proposed on in ``mode`` ("fast" [RCNN], "quality" [SS] or "single"), and
    the boxes are scaled back to the original pixels (the resized longer side is capped at
    ``MAX_ELONGATION`` x ``resize``, which only matters beyond 4:1 aspect ratios). Exact
    duplicates are dropped (the first one is kept, so selective search's ranking is preserved),
    then boxes with a side under ``min_size`` original pixels ([RCNN] code: 20), then all but
    the first ``top_k`` (0 = keep all). A tiny image may give no box at all: shape [0, 4].
    Deterministic (see the module docstring).
    """
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0):
        desc = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"selective_search needs a uint8 RGB image [H, W, 3], got {desc}")
    if mode not in MODES:
        raise ValueError(f"selective_search: mode must be one of {sorted(MODES)}, got {mode!r}")
    height, width = image.shape[:2]
    if min(height, width) < min_size:  # every box would be dropped: skip the work
        return np.zeros((0, 4), dtype=np.float32)
    small = _resize_for_proposals(image, resize, resize_side)  # [h, w, 3] RGB
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))  # OpenCV wants BGR
    getattr(ss, MODES[mode])()
    with _rand_lock:
        if _srand is not None:
            _srand(RANK_SEED)
        rects = np.asarray(ss.process(), dtype=np.int64).reshape(-1, 4)  # [R, 4] (x, y, w, h) in `small`

    _, first = np.unique(rects, axis=0, return_index=True)
    rects = rects[np.sort(first)]  # [R, 4] duplicates dropped, ranking kept
    scale_x = width / small.shape[1]
    scale_y = height / small.shape[0]
    boxes = np.empty(rects.shape, dtype=np.float64)  # [R, 4] xyxy original pixels
    boxes[:, 0] = rects[:, 0] * scale_x
    boxes[:, 1] = rects[:, 1] * scale_y
    boxes[:, 2] = (rects[:, 0] + rects[:, 2]) * scale_x
    boxes[:, 3] = (rects[:, 1] + rects[:, 3]) * scale_y
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)
    boxes = boxes[keep]
    if top_k > 0:
        boxes = boxes[:top_k]
    return boxes.astype(np.float32)  # [R, 4]


def _resize_for_proposals(image: np.ndarray, resize: int, resize_side: str) -> np.ndarray:
    """Resize so that ``resize_side`` is ``resize`` pixels (0: unchanged); aspect kept.

    Small images are enlarged too, as [RCNN] did (MATLAB ``imresize(im, [NaN 500])``).
    """
    if resize_side not in RESIZE_SIDES:
        raise ValueError(f"selective_search: resize_side must be one of {RESIZE_SIDES}, got {resize_side!r}")
    if resize < 0:
        raise ValueError(f"selective_search: resize must be >= 0, got {resize}")
    height, width = image.shape[:2]
    side = {"width": width, "longer": max(height, width), "shorter": min(height, width)}[resize_side]
    if resize == 0 or side == resize:
        return image
    # The longer side is capped at MAX_ELONGATION x resize, so that a sliver (say 2 x 700 px)
    # is not blown up to 500 x 175000 px to make its width 500.
    scale = min(resize / side, MAX_ELONGATION * resize / max(height, width))
    new_width = max(1, round(width * scale))
    new_height = max(1, round(height * scale))
    # INTER_AREA averages when shrinking (anti-aliased, like MATLAB's imresize in [RCNN]).
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_width, new_height), interpolation=interpolation)


def check_proposal_settings(settings: dict) -> dict:
    """``settings`` checked as ``selective_search``'s keyword arguments (ValueError naming the key)."""
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    missing = [k for k in SETTINGS_KEYS if k not in settings]
    if unknown or missing:
        raise ValueError(f"proposal settings: unknown keys {unknown}, missing keys {missing} "
                         f"(expected {list(SETTINGS_KEYS)})")
    if settings["mode"] not in MODES:
        raise ValueError(f"proposal settings: mode must be one of {sorted(MODES)}, got {settings['mode']!r}")
    if settings["resize_side"] not in RESIZE_SIDES:
        raise ValueError(f"proposal settings: resize_side must be one of {RESIZE_SIDES}, "
                         f"got {settings['resize_side']!r}")
    for key in ("resize", "min_size", "top_k"):
        if isinstance(settings[key], bool) or not isinstance(settings[key], int) or settings[key] < 0:
            raise ValueError(f"proposal settings: {key} must be an integer >= 0, got {settings[key]!r}")
    return {key: settings[key] for key in SETTINGS_KEYS}

