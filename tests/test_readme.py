"""The README's Python API example runs as written, against a small detector the test builds."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

import detect
from detect.common.checkpoints import save_detector_checkpoint
from detect.common.config import Config, to_dict
from detect.data.datasets import load_coco
from detect.evaluation.coco import evaluate_detections
from detect.evaluation.run import run_detector
from detect.models.build import build_fast_rcnn, load_detector
from detect.proposals.store import ProposalStore, write_store

README = Path(__file__).resolve().parent.parent / "README.md"


def _api_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_public_api_is_importable_from_the_top():
    for name in ("load_detector", "read_image", "selective_search", "ProposalStore", "evaluate_detections",
                 "load_dataset"):
        assert callable(getattr(detect, name)), name
    assert set(detect.__all__) >= {"load_detector", "read_image", "load_dataset"}


def test_the_readme_api_example_runs(synthetic_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(synthetic_dir, tmp_path / "data" / "syn")
    dataset = load_coco(tmp_path / "data" / "syn" / "val.json")
    cfg = Config()  # a small random Fast R-CNN: the example needs a checkpoint, not a good one
    cfg.model.backbone, cfg.model.weights, cfg.model.freeze_at = "efficientnet_lite0", "none", ""
    cfg.model.head_dim, cfg.model.roi_size = 32, 3
    cfg.test.scale, cfg.test.max_size = 128, 192
    cfg.proposals.resize, cfg.proposals.top_k = 160, 50
    model = build_fast_rcnn(cfg, dataset.class_names, dataset.category_ids)
    save_detector_checkpoint(tmp_path / "runs" / "frcn" / "model_final.pt", kind="fast_rcnn", config=to_dict(cfg),
                             class_names=dataset.class_names, category_ids=dataset.category_ids,
                             state_dict=model.state_dict())
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8)).save("photo.jpg")
    # Proposals: the ground truth and two fixed boxes, so that even random weights score AP > 0.
    boxes = [np.concatenate([r.gt_boxes, [[0, 0, 60, 50], [10, 10, 100, 90]]]).astype(np.float32)
             for r in dataset.records]
    write_store(tmp_path / "proposals" / "val", image_ids=[r.image_id for r in dataset.records],
                boxes_per_image=boxes, meta={"mode": "fast"})

    exec(compile(_api_example(), str(README), "exec"), {})

    *detection_lines, metrics_line = capsys.readouterr().out.splitlines()
    assert detection_lines  # random weights still score the photo's proposals above 0.05
    for line in detection_lines:  # "<class name> <score> [x1, y1, x2, y2]" in the photo's pixels
        name, score, box = line.split(" ", 2)
        x1, y1, x2, y2 = eval(box)
        assert name in dataset.class_names and 0.05 <= float(score) <= 1.0
        assert 0 <= x1 <= x2 <= 128 and 0 <= y1 <= y2 <= 96
    # The example's hand-written loop scores what `detect eval` scores: the same detector, store and cut.
    detector = load_detector(tmp_path / "runs" / "frcn" / "model_final.pt", "cpu")
    store = ProposalStore(tmp_path / "proposals" / "val")
    expected = evaluate_detections(dataset, run_detector(detector, dataset.records, store=store, progress=False))
    ap, ap50 = (float(v) for v in metrics_line.split()[:2])
    assert ap50 > 0 and (ap, ap50) == (expected["AP"], expected["AP50"])
