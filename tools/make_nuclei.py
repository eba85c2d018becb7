"""A small real dense-object dataset: tiles of stardist's fluorescence nuclei image, as COCO.

The ``stardist`` wheel ships ``stardist/data/images/img2d.tif`` (a real 512 x 512 fluorescence
image of about 125 nuclei, 18-34 px wide) with its instance masks ``mask2d.tif`` (0 =
background, one label per nucleus). Each instance's bounding box becomes a COCO box.

Split, so that no pixel of a validation tile is seen in training: the right half (x >= W/2)
is cut into non-overlapping ``--tile`` px validation tiles; training tiles of the same size are
taken every ``--stride`` px over the left half. In a tile, a nucleus keeps the box of its
visible pixels and, as COCO's ``area``, their count; a nucleus with less than half its pixels
inside the tile is marked ``iscrowd: 1`` (ignored by training and evaluation) rather than
dropped, so that a detector is neither rewarded nor punished for a sliver at the border.
Intensities are stretched from the image's 1st to its 99.8th percentile to 0..255, as
stardist's own examples normalise (``csbdeep.utils.normalize(img, 1, 99.8)``); the raw image
is mostly dark.

    python tools/make_nuclei.py --out data/nuclei                  # fetches the wheel with pip
    python tools/make_nuclei.py --out data/nuclei --source stardist-0.9.2-...whl
    python tools/make_nuclei.py --out data/nuclei --source DIR     # a folder with both .tif files

Writes ``OUT/train.json``, ``OUT/val.json`` (COCO; ``file_name`` relative to OUT) and
``OUT/images/{train,val}/*.png`` (8-bit RGB, the grey image replicated), one category
"nucleus" (id 1). The same source and options give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from detect.common.fileio import write_bytes_atomic
from detect.data.synthetic import encode_png

IMAGE, MASK = "img2d.tif", "mask2d.tif"
WHEEL_DIR = "stardist/data/images/"
MIN_VISIBLE = 0.5  # a nucleus with less of its pixels inside a tile is iscrowd (ignored)


def fetch_source(source: str, work: Path) -> tuple[Path, Path]:
    """(image path, mask path) from a folder, a stardist wheel, or (``source`` empty) pip."""
    if not source:
        work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "stardist", "-d", str(work)]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"make_nuclei: `{' '.join(cmd)}` failed; download the stardist wheel by hand "
                             "and pass it with --source")
        wheels = sorted(work.glob("stardist-*.whl"))
        if not wheels:
            raise SystemExit(f"make_nuclei: pip wrote no stardist wheel into {work}")
        source = str(wheels[-1])
    path = Path(source)
    if path.is_dir():
        image, mask = path / IMAGE, path / MASK
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for name in (IMAGE, MASK):
                try:
                    data = z.read(WHEEL_DIR + name)
                except KeyError:
                    raise SystemExit(f"make_nuclei: {path} has no {WHEEL_DIR + name}") from None
                (work / name).parent.mkdir(parents=True, exist_ok=True)
                (work / name).write_bytes(data)
        image, mask = work / IMAGE, work / MASK
    else:
        raise SystemExit(f"make_nuclei: --source {path}: not a folder or a wheel (zip) file")
    for p in (image, mask):
        if not p.is_file():
            raise SystemExit(f"make_nuclei: {p}: no such file")
    return image, mask


def tile_origins(height: int, width: int, tile: int, stride: int) -> tuple[list, list]:
    """(train, val) tile origins (x, y): val tiles cover the right half without overlap; train
    tiles every ``stride`` px over the left half."""
    half = width // 2
    val = [(x, y) for y in range(0, height - tile + 1, tile) for x in range(half, width - tile + 1, tile)]
    train = [(x, y) for y in range(0, height - tile + 1, stride) for x in range(0, half - tile + 1, stride)]
    return train, val


def tile_annotations(mask: np.ndarray, x0: int, y0: int, tile: int, full_area: np.ndarray) -> list[dict]:
    """COCO annotations (without ids) of the nuclei in the tile at (x0, y0)."""
    crop = mask[y0:y0 + tile, x0:x0 + tile]
    anns = []
    for label in np.unique(crop):
        if label == 0:
            continue
        ys, xs = np.nonzero(crop == label)
        x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        visible = len(xs)
        anns.append({"category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": visible,
                     "iscrowd": int(visible < MIN_VISIBLE * full_area[label])})
    return anns


def make_nuclei(out: str | Path, image_path: Path, mask_path: Path, tile: int = 128, stride: int = 64) -> dict:
    """Write the tiled dataset into ``out``; returns a summary (tiles and objects per split)."""
    with Image.open(image_path) as im:
        raw = np.asarray(im).astype(np.float64)  # [H, W] intensities
    if raw.ndim != 2:
        raise SystemExit(f"make_nuclei: {image_path} is not a single-channel image: {raw.shape}")
    lo, hi = np.percentile(raw, [1.0, 99.8])
    grey = np.clip((raw - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    image = np.repeat(grey[:, :, None], 3, axis=2)  # uint8 RGB [H, W, 3]
    with Image.open(mask_path) as im:
        mask = np.asarray(im).astype(np.int64)  # [H, W] instance labels
    if mask.shape != raw.shape:
        raise SystemExit(f"make_nuclei: {mask_path} is {mask.shape}, {image_path} is {raw.shape}")
    if not (0 < tile <= min(mask.shape) // 2 and stride > 0):
        raise SystemExit(f"make_nuclei: need 0 < --tile <= {min(mask.shape) // 2} and --stride > 0")
    full_area = np.bincount(mask.ravel())
    out = Path(out)
    summary = {}
    for split, origins in zip(("train", "val"), tile_origins(*mask.shape, tile, stride)):
        images, annotations = [], []
        for i, (x0, y0) in enumerate(origins):
            name = f"images/{split}/tile_{y0:04d}_{x0:04d}.png"
            write_bytes_atomic(out / name, encode_png(image[y0:y0 + tile, x0:x0 + tile]))
            images.append({"id": i + 1, "file_name": name, "width": tile, "height": tile})
            for ann in tile_annotations(mask, x0, y0, tile, full_area):
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **ann})
        coco = {"info": {"description": f"stardist img2d.tif nuclei, {tile} px tiles", "split": split},
                "images": images, "annotations": annotations,
                "categories": [{"id": 1, "name": "nucleus", "supercategory": "cell"}]}
        write_bytes_atomic(out / f"{split}.json", (json.dumps(coco, sort_keys=True) + "\n").encode())
        kept = [a for a in annotations if not a["iscrowd"]]
        widths = [a["bbox"][2] for a in kept]
        summary[split] = {"tiles": len(images), "objects": len(kept), "ignored": len(annotations) - len(kept),
                          "median_width": float(np.median(widths)) if widths else 0.0}
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--source", default="", help="stardist wheel or folder with img2d.tif and mask2d.tif "
                                                "(default: pip download --no-deps stardist)")
    p.add_argument("--tile", type=int, default=128, help="tile side in pixels (default 128)")
    p.add_argument("--stride", type=int, default=64, help="training tiles' stride in pixels (default 64)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        image, mask = fetch_source(args.source, Path(tmp))
        summary = make_nuclei(args.out, image, mask, args.tile, args.stride)
    for split, s in summary.items():
        print(f"{Path(args.out) / (split + '.json')}: {s['tiles']} tiles, {s['objects']} nuclei "
              f"(median {s['median_width']:.0f} px wide), {s['ignored']} cut by the tile border (iscrowd)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
