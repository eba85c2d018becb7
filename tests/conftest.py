"""Shared fixtures and helpers: the synthetic dataset, a tiny hand-made COCO dataset, fake evaluated runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
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


# ----------------------------------------------------------------------------------------------
# Fake evaluated runs for the report, viewer and browser tests
# ----------------------------------------------------------------------------------------------

RECALL = np.linspace(0, 1, 101).round(2).tolist()  # [101] COCO recall points
PROPOSAL_RECALL = {"top_k": [100, 300, 1000, 2000], "recall@0.5": [0.6, 0.8, 0.9, 0.95],
                   "recall@0.7": [0.3, 0.5, 0.6, 0.7], "AR": [0.35, 0.5, 0.6, 0.66],
                   "MABO": [0.7, 0.75, 0.8, 0.82]}


def write_tiny_coco(root: Path) -> Path:
    """The report tests' dataset: root/val.json and 3 images (id 1 has no ground truth), categories 3 "cat" and 7 "dog" (not contiguous)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    coco = {"images": [{"id": i, "file_name": f"im{i}.png", "width": 64, "height": 48} for i in (1, 2, 3)],
            "annotations": [{"id": 1, "image_id": 2, "category_id": 3, "bbox": [5, 6, 30, 20],
                             "area": 600, "iscrowd": 0},
                            {"id": 2, "image_id": 3, "category_id": 7, "bbox": [20, 10, 40, 30],
                             "area": 1200, "iscrowd": 0}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    (root / "val.json").write_text(json.dumps(coco))
    return root / "val.json"


def write_run(run_dir: Path, *, detector: str, ap: float, timing: dict, data_json: Path | None,
              detections: list | None = None, full: bool = True, config: dict | None = None,
              **metrics_keys) -> Path:
    """A fake evaluated run folder for ``detect compare``: metrics.json (every key the report
    reads when ``full``, then ``metrics_keys``) and, if given, detections.json and config.yaml."""
    metrics = {"detector": detector, "coco": {"AP": ap, "AP50": 0.801, "AP75": 0.55, "APs": -1.0,
                                              "APm": 0.4, "APl": 0.6, "AR1": 0.3, "AR10": 0.5,
                                              "AR100": 0.65}}
    if full:
        dog = [round(0.9 - 0.5 * r, 4) if r <= 0.8 else -1.0 for r in RECALL]  # -1: unreached recall
        metrics.update({
            "name": run_dir.name, "backbone": "efficientnet_lite0", "device": "cpu",
            "num_parameters": 3_412_345, "num_images": 3,
            "per_class_AP": {"cat": ap + 0.1, "dog": 0.324}, "per_class_AP50": {"cat": 0.9, "dog": -1.0},
            "voc07": {"mAP": ap + 0.2, "per_class_AP": {"cat": ap + 0.2, "dog": -1.0}},
            "voc": {"mAP": -1.0, "per_class_AP": {"cat": -1.0, "dog": -1.0}},
            "pr_curve_50": {"recall": RECALL, "precision": {"all": [round(1 - ap * r, 4) for r in RECALL],
                                                            "cat": [1.0] * 101, "dog": dog}},
            "ap_per_iou": {"iou": [round(0.5 + 0.05 * i, 2) for i in range(10)],
                           "AP": [round(0.8 - 0.07 * i, 3) for i in range(10)]},
            "timing_ms_per_image": timing, "images_per_second": 1000.0 / sum(timing.values()),
            "peak_memory_mb": 1234.5, "train_time_s": 95.0, "proposal_recall": PROPOSAL_RECALL})
    if data_json is not None:
        metrics["data"] = {"format": "coco", "path": str(data_json), "images": "", "split": ""}
    metrics.update(metrics_keys)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if detections is not None:
        (run_dir / "detections.json").write_text(json.dumps(detections))
    return run_dir


FAST_TIMING = {"proposals": 1900.0, "backbone": 10.0, "roi_head": 4.0, "postprocess": 1.0}  # 15 ms
RCNN_TIMING = {"proposals": 1900.0, "warp": 30.0, "features": 300.0, "svm": 5.0, "bbox_reg": 2.0,
               "postprocess": 1.0}  # 338 ms: 338 / 15 = 22.5x
