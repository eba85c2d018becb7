"""The built-in synthetic dataset: cluttered scenes of four shape classes, in COCO format.

``detect make-synthetic --out DIR --train N --val M --seed S`` writes::

    DIR/train.json, DIR/val.json     COCO instances files (file names relative to DIR)
    DIR/images/train/000000.png ...  the images
    DIR/generator.json               the generator version and seed that drew the images

The dataset of the demo and the tests, built not to be trivially easy (sizes and probabilities:
the constants below): four classes with non-contiguous category ids (``CATEGORIES``) whose hues
overlap and whose textures are shared, so only the shape tells them apart; occlusion; cluttered
backgrounds; blur and noise. Selective search (fast mode) finds about 93% of the objects at IoU
0.5. Boxes are the extent of the visible pixels (PASCAL VOC); an object under ``MIN_VISIBLE``
visible is ``iscrowd=1``, one with no visible pixel is dropped.

Determinism: image i of split s (train 0, val 1) is drawn from
``np.random.default_rng([seed, s, i])``, so ``generate_image`` redraws any image alone, and the
same seed gives byte-identical files. A re-run into the same folder rewrites nothing complete.
"""

from __future__ import annotations

import colorsys
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from detect.common.fileio import check_settings, write_bytes_atomic, write_settings

# Bump when the drawing changes: a folder drawn by another version is redrawn, not reused.
GENERATOR_VERSION = 1
SPLITS = ("train", "val")  # split index 0 and 1 of the per-image seed

CATEGORIES = ((1, "disc"), (3, "box"), (7, "triangle"), (9, "ring"))  # (category id, name)
# Hue ranges in degrees (taken modulo 360): 200 degrees each, overlapping the neighbours'.
HUE_RANGES = {"disc": (0.0, 200.0), "box": (90.0, 290.0), "triangle": (180.0, 380.0), "ring": (270.0, 470.0)}
OWN_TEXTURES = {"disc": ("radial",), "box": ("stripes",), "triangle": ("checker", "dots"),
                "ring": ("speckle",)}
TEXTURES = ("radial", "stripes", "checker", "dots", "speckle")
BORROWED_TEXTURE_PROB = 0.25  # an object wears a texture drawn from all TEXTURES

IMAGE_SIDE = (320, 640)  # each image side, uniform
OBJECT_SCALE = (22.0, 180.0)  # sqrt(w * h) of an object's box, log-uniform
OBJECT_SIDE = (12, 200)  # box sides are clamped to this
MAX_ASPECT = 3.0  # w / h log-uniform in [1/3, 3]
MAX_OBJECTS = 6
EMPTY_PROB = 0.07
OVERLAP_PROB = 0.35  # place an object over an earlier one
MIN_VISIBLE = 0.3  # less visible than this -> iscrowd=1
BLUR_PROB, BLUR_SIGMA = 0.4, (0.5, 1.5)
NOISE_PROB, NOISE_SIGMA = 0.5, (2.0, 10.0)
# Fast PNG settings (about 13 ms for a 480 x 480 image): noise barely compresses anyway.
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
              cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


@dataclass
class SyntheticObject:
    category_id: int
    box: tuple[float, float, float, float]  # xyxy extent of the visible pixels
    iscrowd: int  # 1 when less than MIN_VISIBLE of the object is visible
    visible_fraction: float


def make_synthetic(out_dir: str | Path, num_train: int, num_val: int, seed: int) -> tuple[Path, Path]:
    """Write the synthetic dataset into ``out_dir``; return the paths of train.json and val.json.
    Images there from the same seed and version (``generator.json``) are kept; others, and those
    past ``num_train``/``num_val``, are removed."""
    if num_train < 1 or num_val < 1:
        raise ValueError(f"make-synthetic needs at least 1 train and 1 val image, got {num_train} "
                         f"and {num_val}")
    if seed < 0:
        raise ValueError(f"make-synthetic: the seed must be >= 0, got {seed}")
    out_dir = Path(out_dir)
    marker = {"generator_version": GENERATOR_VERSION, "seed": int(seed)}
    marker_path = out_dir / "generator.json"
    try:
        reuse_images = check_settings(marker_path, marker, hint="the images are redrawn")
    except ValueError:  # another seed or version (SettingsMismatch), or a damaged marker
        reuse_images = False
    if not reuse_images:  # clear what another seed or version drew, so no stale file survives a crash
        for split in SPLITS:
            _remove_images(out_dir / "images" / split, first_index=0)
            (out_dir / f"{split}.json").unlink(missing_ok=True)
        write_settings(marker_path, marker)

    json_paths = []
    with tqdm(total=num_train + num_val, desc="make-synthetic", unit="img", disable=None) as bar:
        for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
            image_dir = out_dir / "images" / split
            images, annotations = [], []
            for i in range(count):
                image, objects = generate_image(seed, split_index, i)
                path = image_dir / f"{i:06d}.png"
                if not (reuse_images and path.is_file()):
                    write_bytes_atomic(path, encode_png(image))
                images.append({"id": i + 1, "file_name": f"images/{split}/{i:06d}.png",
                               "height": int(image.shape[0]), "width": int(image.shape[1])})
                for obj in objects:
                    x1, y1, x2, y2 = obj.box
                    annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                        "category_id": obj.category_id,
                                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                                        "area": (x2 - x1) * (y2 - y1), "iscrowd": obj.iscrowd})
                bar.update(1)
            _remove_images(image_dir, first_index=count)  # left by a larger earlier run
            coco = {"info": {"description": "detect synthetic shapes", "split": split, **marker},
                    "images": images, "annotations": annotations,
                    "categories": [{"id": cat_id, "name": name, "supercategory": "shape"}
                                   for cat_id, name in CATEGORIES]}
            json_paths.append(_write_json_if_changed(out_dir / f"{split}.json", coco))
    return json_paths[0], json_paths[1]


def encode_png(image: np.ndarray) -> bytes:
    """uint8 RGB [H, W, 3] -> PNG bytes, with fixed parameters (byte-identical for equal input)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]), PNG_PARAMS)
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode a PNG")
    return buf.tobytes()


def _write_json_if_changed(path: Path, obj: dict) -> Path:
    """Write ``obj`` as compact JSON with sorted keys unless ``path`` holds just that; returns ``path``."""
    data = (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
    if not (path.is_file() and path.read_bytes() == data):
        write_bytes_atomic(path, data)
    return path


def _remove_images(image_dir: Path, first_index: int) -> None:
    """Delete the images this generator named (``000123.png``) from ``first_index`` on."""
    for path in image_dir.glob("*.png"):  # none in a missing folder
        match = re.fullmatch(r"(\d{6})\.png", path.name)
        if match and int(match.group(1)) >= first_index:
            path.unlink()


def generate_image(seed: int, split_index: int,
                   image_index: int) -> tuple[np.ndarray, list[SyntheticObject]]:
    """Draw one image: uint8 RGB [H, W, 3] and its annotated objects (boxes xyxy pixels)."""
    rng = np.random.default_rng([seed, split_index, image_index])
    height = int(rng.integers(IMAGE_SIDE[0], IMAGE_SIDE[1] + 1))
    width = int(rng.integers(IMAGE_SIDE[0], IMAGE_SIDE[1] + 1))
    canvas = _background(rng, height, width)  # [H, W, 3] float32, 0..255
    _draw_clutter(rng, canvas)

    owner = np.full((height, width), -1, np.int16)  # [H, W] index of the object on top, -1 none
    placed: list[tuple[int, int, int, int, int, int]] = []  # (category id, x0, y0, w, h, pixels)
    num_objects = 0 if rng.random() < EMPTY_PROB else int(rng.integers(1, MAX_OBJECTS + 1))
    for index in range(num_objects):
        category_id, name = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        w, h = _object_size(rng, height, width)
        x0, y0 = _object_position(rng, w, h, height, width, placed)
        alpha = _silhouette(rng, name, w, h)  # [h, w] uint8, 255 inside
        kinds = TEXTURES if rng.random() < BORROWED_TEXTURE_PROB else OWN_TEXTURES[name]
        texture_kind = kinds[int(rng.integers(len(kinds)))]
        colour = _hsv(rng.uniform(*HUE_RANGES[name]), rng.uniform(0.25, 1.0), rng.uniform(0.3, 1.0))
        texture = _texture(rng, texture_kind, colour, h, w)  # [h, w, 3]
        _paste(canvas, texture, alpha, x0, y0)
        inside = alpha >= 128  # [h, w]
        owner[y0:y0 + h, x0:x0 + w][inside] = index
        placed.append((category_id, x0, y0, w, h, int(inside.sum())))

    _draw_foreground_distractors(rng, canvas, owner)
    if rng.random() < BLUR_PROB:
        canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(*BLUR_SIGMA))
    if rng.random() < NOISE_PROB:
        sigma = np.float32(rng.uniform(*NOISE_SIGMA))
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * sigma
    np.clip(canvas, 0, 255, out=canvas)
    return np.rint(canvas, out=canvas).astype(np.uint8), _ground_truth(owner, placed)  # [H, W, 3] uint8 RGB


def _ground_truth(owner: np.ndarray, placed: list) -> list[SyntheticObject]:
    """Boxes of the visible pixels of each placed object (VOC convention), crowd if mostly hidden."""
    objects = []
    for index, (category_id, x0, y0, w, h, pixels) in enumerate(placed):
        visible = owner[y0:y0 + h, x0:x0 + w] == index  # [h, w]
        rows = np.flatnonzero(visible.any(axis=1))
        cols = np.flatnonzero(visible.any(axis=0))
        if len(rows) == 0:
            continue
        fraction = float(visible.sum()) / max(pixels, 1)
        box = (float(x0 + cols[0]), float(y0 + rows[0]),
               float(x0 + cols[-1] + 1), float(y0 + rows[-1] + 1))
        objects.append(SyntheticObject(category_id=category_id, box=box,
                                       iscrowd=int(fraction < MIN_VISIBLE), visible_fraction=fraction))
    return objects


def _object_size(rng: np.random.Generator, height: int, width: int) -> tuple[int, int]:
    scale = math.exp(rng.uniform(math.log(OBJECT_SCALE[0]), math.log(OBJECT_SCALE[1])))
    aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))  # w / h
    w = int(np.clip(round(scale * math.sqrt(aspect)), OBJECT_SIDE[0], min(OBJECT_SIDE[1], width)))
    h = int(np.clip(round(scale / math.sqrt(aspect)), OBJECT_SIDE[0], min(OBJECT_SIDE[1], height)))
    return w, h


def _object_position(rng: np.random.Generator, w: int, h: int, height: int, width: int,
                     placed: list) -> tuple[int, int]:
    """Top-left corner, inside the image; sometimes overlapping an earlier object's box."""
    if placed and rng.random() < OVERLAP_PROB:
        _, px, py, pw, ph, _ = placed[int(rng.integers(len(placed)))]
        cx = rng.uniform(px - w / 2 + 1, px + pw + w / 2 - 1)
        cy = rng.uniform(py - h / 2 + 1, py + ph + h / 2 - 1)
        x0, y0 = round(cx - w / 2), round(cy - h / 2)
    else:
        x0, y0 = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
    return int(np.clip(x0, 0, width - w)), int(np.clip(y0, 0, height - h))


def _silhouette(rng: np.random.Generator, name: str, w: int, h: int) -> np.ndarray:
    """Anti-aliased alpha mask [h, w] uint8 of one shape filling its w x h box."""
    alpha = np.zeros((h, w), np.uint8)
    s = 16  # cv2 drawing with shift=4: coordinates in 1/16 px
    if name == "box":
        alpha[:] = 255
    elif name in ("disc", "ring"):
        center = axes = (round((w - 1) / 2 * s), round((h - 1) / 2 * s))  # the box's centre and half sides
        cv2.ellipse(alpha, center, axes, 0, 0, 360, 255, -1, cv2.LINE_AA, 4)
        if name == "ring":
            k = rng.uniform(0.45, 0.7)  # hole size relative to the outer ellipse
            inner = (round(axes[0] * k), round(axes[1] * k))
            cv2.ellipse(alpha, center, inner, 0, 0, 360, 0, -1, cv2.LINE_AA, 4)
    elif name == "triangle":
        t = rng.uniform(0.15, 0.85)  # where the apex sits along its side
        r, b = w - 1, h - 1
        corners = [  # apex up, down, left, right; the triangle spans the whole box
            [(t * r, 0), (r, b), (0, b)], [(t * r, b), (0, 0), (r, 0)],
            [(0, t * b), (r, 0), (r, b)], [(r, t * b), (0, 0), (0, b)],
        ][int(rng.integers(4))]
        points = np.round(np.array(corners) * s).astype(np.int32)  # [3, 2]
        cv2.fillPoly(alpha, [points], 255, cv2.LINE_AA, 4)
    return alpha


def _hsv(hue_degrees: float, saturation: float, value: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((hue_degrees % 360.0) / 360.0, saturation, value)
    return np.array([r, g, b], np.float32) * 255.0  # [3]


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.9), rng.uniform(0.1, 0.95))


def _texture(rng: np.random.Generator, kind: str, colour: np.ndarray, h: int, w: int) -> np.ndarray:
    """A [h, w, 3] float32 texture mixing ``colour`` with a second colour of related hue."""
    hue, sat, val = colorsys.rgb_to_hsv(*(colour / 255.0))
    other_value = val * rng.uniform(0.3, 0.7) if rng.random() < 0.6 else min(1.0, val + rng.uniform(0.3, 0.6))
    second = _hsv(hue * 360 + rng.uniform(-40, 40), sat * rng.uniform(0.4, 1.0), other_value)
    ys = np.arange(h, dtype=np.float32)[:, None]  # [h, 1]
    xs = np.arange(w, dtype=np.float32)[None, :]  # [1, w]
    short = min(w, h)
    if kind == "radial":
        t = np.clip(np.sqrt(((xs + 0.5) / (w / 2) - 1) ** 2 + ((ys + 0.5) / (h / 2) - 1) ** 2), 0, 1)  # [h, w]
    elif kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(4, max(6.0, short / 2.5))
        t = ((xs * math.cos(angle) + ys * math.sin(angle)) % period < period / 2).astype(np.float32)
    elif kind == "checker":
        cell = rng.uniform(3, max(4.0, short / 3))
        t = ((np.floor(xs / cell) + np.floor(ys / cell)) % 2).astype(np.float32)
    elif kind == "dots":
        spacing = rng.uniform(5, max(7.0, short / 2.5))
        radius = spacing * rng.uniform(0.2, 0.38)
        t = (((xs % spacing) - spacing / 2) ** 2 + ((ys % spacing) - spacing / 2) ** 2 < radius ** 2).astype(np.float32)
    else:  # speckle
        t = np.clip(rng.normal(0.15, 0.2, size=(h, w)), 0, 1).astype(np.float32)
    return colour + t[:, :, None] * (second - colour)  # [h, w, 3]


def _paste(canvas: np.ndarray, texture: np.ndarray, alpha: np.ndarray, x0: int, y0: int) -> None:
    """Blend ``texture`` [h, w, 3] through ``alpha`` [h, w] onto ``canvas`` at (x0, y0), clipped."""
    height, width = canvas.shape[:2]
    h, w = alpha.shape
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    a = alpha[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0, None].astype(np.float32) / 255.0  # [h', w', 1]
    region = canvas[cy0:cy1, cx0:cx1]
    region += a * (texture[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] - region)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A colour gradient plus colour noise, drawn coarse and upsampled: [H, W, 3] float32."""
    start, end = _random_colour(rng), _random_colour(rng)
    angle = rng.uniform(0, 2 * math.pi)
    grid_h, grid_w = (int(v) for v in rng.integers(3, 9, size=2))
    ys = np.linspace(0, 1, grid_h, dtype=np.float32)[:, None] * math.sin(angle)  # [h, 1]
    xs = np.linspace(0, 1, grid_w, dtype=np.float32)[None, :] * math.cos(angle)  # [1, w]
    ramp = xs + ys  # [h, w]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    grid = start + ramp[:, :, None] * (end - start)  # [h, w, 3]
    grid += rng.normal(0, rng.uniform(8, 30), size=(grid_h, grid_w, 3))
    return cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)


def _irregular_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float,
                       num_vertices: int, irregularity: float) -> np.ndarray:
    """A star-shaped polygon [V, 2] int32 (pixels) with jagged radii: no class looks like it."""
    angles = np.sort(rng.uniform(0, 2 * math.pi, size=num_vertices))
    radii = radius * rng.uniform(1 - irregularity, 1, size=num_vertices)
    points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return np.round(points).astype(np.int32)


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Distractors behind the objects: textured patches, lines and small polygons."""
    height, width = canvas.shape[:2]
    for _ in range(int(rng.integers(1, 5))):  # large patches wearing the classes' textures
        radius = rng.uniform(30, 160)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        points = _irregular_polygon(rng, cx, cy, radius, int(rng.integers(5, 11)), 0.6)
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0) + 1
        alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(alpha, [(points - [x0, y0]).astype(np.int32)], int(rng.integers(90, 256)), cv2.LINE_AA)
        kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
        texture = _texture(rng, kind, _random_colour(rng), y1 - y0, x1 - x0)
        _paste(canvas, texture, alpha, int(x0), int(y0))
    for _ in range(int(rng.integers(2, 12))):
        cv2.line(canvas, *_random_line(rng, height, width, max_thickness=3))
    for _ in range(int(rng.integers(2, 10))):
        cv2.fillPoly(canvas, *_random_polygon(rng, height, width, max_radius=14))


def _random_line(rng: np.random.Generator, height: int, width: int, max_thickness: int) -> tuple:
    """(start, end, colour, thickness) of a random line, as ``cv2.line`` takes them."""
    p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
    p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
    return p0, p1, _random_colour(rng).tolist(), int(rng.integers(1, max_thickness + 1))


def _random_polygon(rng: np.random.Generator, height: int, width: int, max_radius: float) -> tuple:
    """([points int32 [V, 2]], colour) of a small random polygon, as ``cv2.fillPoly`` takes them."""
    points = _irregular_polygon(rng, rng.uniform(0, width), rng.uniform(0, height),
                                rng.uniform(3, max_radius), int(rng.integers(3, 8)), 0.7)
    return [points], _random_colour(rng).tolist()


def _draw_foreground_distractors(rng: np.random.Generator, canvas: np.ndarray, owner: np.ndarray) -> None:
    """Thin lines and small polygons drawn over the objects; they hide what they cover."""
    height, width = canvas.shape[:2]
    cover = np.zeros((height, width), np.uint8)  # [H, W] 255 where a distractor was drawn
    for _ in range(int(rng.integers(0, 4))):
        p0, p1, colour, thickness = _random_line(rng, height, width, max_thickness=2)
        cv2.line(canvas, p0, p1, colour, thickness)
        cv2.line(cover, p0, p1, 255, thickness)
    for _ in range(int(rng.integers(0, 4))):
        points, colour = _random_polygon(rng, height, width, max_radius=10)
        cv2.fillPoly(canvas, points, colour)
        cv2.fillPoly(cover, points, 255)
    owner[cover > 0] = -1
