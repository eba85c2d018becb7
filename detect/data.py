"""Datasets in one internal representation, and robust image reading.

``Dataset`` holds ``ImageRecord``s with ground truth as float xyxy pixels and contiguous class
indices 1..K (0 is background). ``Dataset.category_ids[k - 1]`` is the dataset's own category
id of class k: the only place indices map back to category ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(Exception):
    """An image that cannot be read. ``str()`` names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class ImageRecord:
    image_id: int
    file_name: str  # absolute path to the image file
    width: int  # as the user sees the image (after EXIF rotation)
    height: int
    gt_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # [G, 4] xyxy
    gt_classes: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # [G] in 1..K
    gt_difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))  # [G] VOC flag


@dataclass
class Dataset:
    name: str
    records: list[ImageRecord]
    class_names: list[str]  # [K] names of classes 1..K (background is not listed)
    category_ids: list[int]  # [K] dataset category id of class k at position k - 1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def by_id(self) -> dict[int, ImageRecord]:
        return {r.image_id: r for r in self.records}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 RGB [H, W, 3], in the orientation the user sees.

    Handles EXIF rotation, grayscale, palette, RGBA (alpha dropped) and 16-bit images (scaled
    to 8 bits). Raises ``ImageReadError`` naming the file for missing, empty, corrupt or truncated
    files and for anything that is not an image.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot stat: {e.strerror}") from None
    if size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            return _to_rgb8(im)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unrecognised format)") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(path, f"corrupt or truncated image ({e})") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from None


def _to_rgb8(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if a.max(initial=0) > 255 else 255.0
        a = np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min(initial=0)), float(a.max(initial=1))
        a = ((a - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)
