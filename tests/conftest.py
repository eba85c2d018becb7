"""Shared fixtures: the built-in synthetic dataset and a tiny hand-made COCO dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """The synthetic dataset, 8 train and 4 val images, seed 0: a folder holding train.json,
    val.json (file names relative to the folder) and images/{train,val}/*.png.
    Category ids 1 disc, 3 box, 7 triangle, 9 ring (classes 1..4)."""
    from detect.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, num_train=8, num_val=4, seed=0)
    return out


# The tiny_coco dataset. Category ids are non-contiguous and listed out of order: after loading,
# class 1 is "cat" (id 2) and class 2 is "dog" (id 5).
TINY_COCO = {
    "images": [
        {"id": 1, "file_name": "a.png", "width": 80, "height": 60},
        {"id": 2, "file_name": "b.png", "width": 64, "height": 48},
        {"id": 3, "file_name": "c.png", "width": 50, "height": 50},  # no annotations
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [50, 5, 20.5, 10], "area": 205, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [0, 0, 64, 48], "area": 3072, "iscrowd": 0},
    ],
    "categories": [{"id": 5, "name": "dog"}, {"id": 2, "name": "cat"}],
}


@pytest.fixture
def tiny_coco(tmp_path) -> tuple[Path, Path]:
    """A hand-made 3-image COCO dataset (see TINY_COCO above): returns (json_path, image_dir).

    The JSON is tmp_path/tiny.json and the PNGs are in tmp_path/images (not the JSON's folder,
    so loaders must be given image_dir). Each object is a flat-coloured rectangle on grey:
    image 1 (80x60) has a cat at xyxy [10, 20, 40, 60] and a dog at [50, 5, 70.5, 15]; image 2
    (64x48) is all dog, [0, 0, 64, 48]; image 3 (50x50) has nothing.
    """
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    colours = {2: (220, 40, 40), 5: (40, 40, 220)}
    for entry in TINY_COCO["images"]:
        pixels = np.full((entry["height"], entry["width"], 3), 128, np.uint8)
        for ann in TINY_COCO["annotations"]:
            if ann["image_id"] == entry["id"]:
                x, y, w, h = ann["bbox"]
                pixels[int(y):int(y + h), int(x):int(x + w)] = colours[ann["category_id"]]
        Image.fromarray(pixels).save(image_dir / entry["file_name"])
    json_path = tmp_path / "tiny.json"
    json_path.write_text(json.dumps(TINY_COCO))
    return json_path, image_dir


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for modules of small tensors: OpenMP's spin-waits cost a busy
    2-core runner far more than a second thread gains (use via ``pytestmark``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
