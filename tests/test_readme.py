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
from detect.models.build import build_fast_rcnn
from detect.proposals.store import write_store

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
    boxes = [np.array([[0, 0, 60, 50], [10, 10, 100, 90]], np.float32) for _ in dataset.records]
    write_store(tmp_path / "proposals" / "val", image_ids=[r.image_id for r in dataset.records],
                boxes_per_image=boxes, meta={"mode": "fast"})

    exec(compile(_api_example(), str(README), "exec"), {})

    printed = capsys.readouterr().out.splitlines()
    assert len(printed) >= 1
    ap, ap50 = (float(v) for v in printed[-1].split()[:2])  # the metrics line
    assert 0.0 <= ap <= ap50 <= 1.0
