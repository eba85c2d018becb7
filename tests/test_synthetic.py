"""The synthetic dataset: determinism, re-runs, the properties it promises, and the CLI."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from detect.cli import main
from detect.data.datasets import load_coco
from detect.data.images import read_image
from detect.data import synthetic
from detect.data.synthetic import make_synthetic
from detect.data.synthetic import CATEGORIES, generate_image


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    make_synthetic(tmp_path / "a", num_train=3, num_val=2, seed=7)
    make_synthetic(tmp_path / "b", num_train=3, num_val=2, seed=7)
    first, second = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert len(first) == 3 + 2 + 3  # images, train.json, val.json, generator.json
    assert first == second
    make_synthetic(tmp_path / "c", num_train=3, num_val=2, seed=8)
    other = _digests(tmp_path / "c")
    assert other.keys() == first.keys()
    assert all(other[name] != first[name] for name in first if name.endswith(".png"))
    assert other["train.json"] != first["train.json"]


def test_rerun_keeps_complete_files_and_repairs_missing_ones(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    make_synthetic(out, num_train=3, num_val=1, seed=5)
    before = _digests(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    make_synthetic(out, num_train=3, num_val=1, seed=5)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes  # no-op

    (out / "images" / "train" / "000001.png").unlink()
    make_synthetic(out, num_train=3, num_val=1, seed=5)
    assert _digests(out) == before  # regenerated alone, identical

    # A run with another seed is killed after one image; its re-run must not reuse seed 5's.
    real_generate_image = synthetic.generate_image
    def generate_then_crash(seed, split_index, image_index):
        if image_index == 1:
            raise KeyboardInterrupt
        return real_generate_image(seed, split_index, image_index)
    monkeypatch.setattr(synthetic, "generate_image", generate_then_crash)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(out, num_train=3, num_val=1, seed=6)
    monkeypatch.undo()
    make_synthetic(out, num_train=2, num_val=1, seed=6)
    assert not (out / "images" / "train" / "000002.png").exists()  # extra image removed
    fresh = tmp_path / "fresh"
    make_synthetic(fresh, num_train=2, num_val=1, seed=6)
    assert _digests(out) == _digests(fresh)


def test_any_image_can_be_regenerated_alone(synthetic_dir):
    coco = json.loads((synthetic_dir / "val.json").read_text())
    entry = coco["images"][2]
    image, objects = generate_image(0, 1, 2)  # seed 0, split val, image 2
    np.testing.assert_array_equal(read_image(synthetic_dir / entry["file_name"]), image)
    annotations = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
    assert [a["bbox"] for a in annotations] == [[o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]]
                                                for o in objects]


def test_synthetic_dataset_loads_cleanly(synthetic_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train = load_coco(synthetic_dir / "train.json", check_images=True)
        val = load_coco(synthetic_dir / "val.json", check_images=True)
    assert (len(train), len(val)) == (8, 4)
    assert train.category_ids == [1, 3, 7, 9]
    assert train.class_names == ["disc", "box", "triangle", "ring"]
    assert train.report.num_boxes > 8


def test_generated_set_has_the_promised_variety():
    images, boxes, labels, counts = [], [], [], []
    for i in range(60):
        image, objects = generate_image(123, 0, i)
        height, width = image.shape[:2]
        images.append((height, width))
        counts.append(len(objects))
        for obj in objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (i, obj)
            assert obj.iscrowd == int(obj.visible_fraction < 0.3)
            if not obj.iscrowd:
                boxes.append(obj.box)
                labels.append(obj.category_id)
    sizes = np.array(images)
    assert sizes.min() >= 320 and sizes.max() <= 640 and len(np.unique(sizes)) > 30
    assert max(counts) <= 6 and 0 in counts and 1 < np.mean(counts) < 5
    boxes = np.array(boxes)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert min(w.min(), h.min()) <= 16 and max(w.max(), h.max()) >= 150  # small to large
    aspect = w / h
    assert aspect.min() <= 0.5 and aspect.max() >= 2.0  # tall and wide
    ids, per_class = np.unique(labels, return_counts=True)
    assert ids.tolist() == sorted(cat_id for cat_id, _ in CATEGORIES)
    assert per_class.min() >= 0.1 * len(labels)


def test_cli_make_synthetic(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["make-synthetic", "--out", str(out), "--train", "2", "--val", "1", "--seed", "3"]) == 0
    assert (out / "train.json").is_file() and (out / "images" / "val" / "000000.png").is_file()
    assert "train.json: 2 images" in capsys.readouterr().out
    assert main(["make-synthetic", "--out", str(out), "--train", "0", "--val", "1"]) == 2
    assert "at least 1 train and 1 val image" in capsys.readouterr().err
