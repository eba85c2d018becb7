"""Reading images as the user sees them (``read_image``), and finding image files on disk."""

from __future__ import annotations

import glob
import os
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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 RGB [H, W, 3], in the orientation the user sees (EXIF applied), from
    any common format, mode and bit depth; else ``ImageReadError`` naming the file and why."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageReadError(path, f"broken symbolic link (its target {os.readlink(path)} "
                                       "does not exist)") from None
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


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as the user sees it (after EXIF rotation), from the header alone."""
    with Image.open(path) as im:
        width, height = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # 5-8 transpose


def _to_rgb8(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # one channel, more than 8 bits: scaled to 0..255
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            lo, hi = float(a.min(initial=0)), float(a.max(initial=1))
            a = ((a - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8)
        else:
            peak = 65535.0 if a.max(initial=0) > 255 else 255.0
            a = np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


def find_images(inputs: list[str], *, exclude: str | os.PathLike | None = None,
                unsupported: list[Path] | None = None) -> list[Path]:
    """Files, folders (searched recursively for IMAGE_EXTENSIONS, any case) and globs -> sorted
    absolute paths (links not followed), less those under ``exclude``. A file named explicitly
    is kept whatever its name; an input matching nothing raises FileNotFoundError. The folders'
    and globs' other files are appended, sorted, to ``unsupported`` when given."""
    found: set[Path] = set()
    others: set[Path] = set()

    def absolute(path: str | os.PathLike) -> Path:  # normalised, but a link still names itself
        return Path(os.path.abspath(path))

    def add(path: Path) -> None:
        if path.is_dir():  # every file under it
            for root, _, names in os.walk(path):
                for name in names:
                    add(Path(root, name))
        else:
            (found if path.suffix.lower() in IMAGE_EXTENSIONS else others).add(absolute(path))

    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            add(path)
        elif path.is_file():
            found.add(absolute(path))  # named explicitly: kept whatever its extension
        elif glob.has_magic(item):
            matches = [Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True)]
            if not matches:
                raise FileNotFoundError(f"--input {item!r}: the pattern matches no files")
            for m in matches:
                add(m)
        else:
            hint = " (config overrides go before --input)" if "=" in item else ""
            raise FileNotFoundError(f"--input {item!r}: no such file or folder{hint}")
    if exclude is not None:
        excluded = {absolute(exclude), Path(exclude).resolve()}
        found = {p for p in found if not any(map(p.is_relative_to, excluded))}
        others = {p for p in others if not any(map(p.is_relative_to, excluded))}
    if unsupported is not None:
        unsupported.extend(sorted(others - found, key=str))
    return sorted(found, key=str)
