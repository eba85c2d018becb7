"""tools/make_nuclei.py: instance masks become COCO boxes, tiles split without shared pixels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from detect.data.datasets import load_coco

REPO = Path(__file__).resolve().parents[1]


def _source(folder: Path) -> dict[int, tuple[int, int, int, int]]:
    """A 64 x 64 16-bit image with four labelled rectangles; returns label -> xyxy (exclusive)."""
    rects = {1: (2, 3, 9, 11),      # inside train tile (0, 0)
             2: (14, 20, 18, 26),   # straddles train tiles (0, 16) and (8, 16)
             7: (30, 40, 36, 44),   # straddles the split at x = 32: 2 px left, 4 px right
             9: (40, 4, 47, 12)}    # inside val tile (32, 0)
    mask = np.zeros((64, 64), np.uint16)
    image = np.full((64, 64), 300, np.uint16)
    for label, (x1, y1, x2, y2) in rects.items():
        mask[y1:y2, x1:x2] = label
        image[y1:y2, x1:x2] = 3000 + 100 * label
    folder.mkdir()
    Image.fromarray(image).save(folder / "img2d.tif")
    Image.fromarray(mask).save(folder / "mask2d.tif")
    return rects


def _run(source: Path, out: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "tools" / "make_nuclei.py"), "--out", str(out), "--source",
                    str(source), "--tile", "16", "--stride", "8"], check=True, capture_output=True)


def test_boxes_crowd_flags_and_split(tmp_path):
    rects = _source(tmp_path / "src")
    _run(tmp_path / "src", tmp_path / "a")
    train, val = load_coco(tmp_path / "a" / "train.json"), load_coco(tmp_path / "a" / "val.json")
    origin = {}
    for ds in (train, val):
        for r in ds.records:
            y0, x0 = (int(v) for v in Path(r.file_name).stem.split("_")[1:])
            origin[r.file_name] = (x0, y0)
            assert r.width == r.height == 16
    assert all(origin[r.file_name][0] + 16 <= 32 for r in train.records)  # train: left half only
    assert sorted(origin[r.file_name] for r in val.records) == [(x, y) for x in (32, 48) for y in (0, 16, 32, 48)]

    def boxes_in(ds, x0, y0):
        r = next(r for r in ds.records if origin[r.file_name] == (x0, y0))
        return {tuple(b): bool(c) for b, c in zip(r.gt_boxes.tolist(), r.gt_crowd)}

    assert boxes_in(train, 0, 0) == {(2.0, 3.0, 9.0, 11.0): False}
    # label 2 (4 x 6 px) in the tile at x 8: all of it; in the tile at x 0: 2 of its 4 columns
    assert boxes_in(train, 8, 16)[(6.0, 4.0, 10.0, 10.0)] is False
    assert boxes_in(train, 0, 16) == {(14.0, 4.0, 16.0, 10.0): False}  # exactly half visible: kept
    # label 7: its 2 left columns (a third) in train tile (16, 32) are crowd, its 4 right ones in val
    assert boxes_in(train, 16, 32) == {(14.0, 8.0, 16.0, 12.0): True}
    assert boxes_in(val, 32, 32) == {(0.0, 8.0, 4.0, 12.0): False}
    assert boxes_in(val, 32, 0) == {(8.0, 4.0, 15.0, 12.0): False}
    assert len(rects) == 4
    # the percentile stretch: background dark, objects bright, 8-bit RGB
    pixels = np.asarray(Image.open(tmp_path / "a" / "images" / "val" / "tile_0000_0032.png"))
    assert pixels.shape == (16, 16, 3) and pixels[0, 0, 0] == 0 and pixels[6, 10, 0] == 255


def test_same_source_same_bytes(tmp_path):
    _source(tmp_path / "src")
    _run(tmp_path / "src", tmp_path / "a")
    _run(tmp_path / "src", tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
