"""detect tune-proposals: its recall is the toolkit's, its choice and its YAML are what
`detect propose` reproduces, a killed run resumes, an unreachable target says by how much."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detect.cli import main
from detect.common.box_ops import box_iou
from detect.common.config import check_proposal_settings, load_config, to_dict
from detect.data.datasets import Dataset, load_coco
from detect.data.images import read_image
from detect.evaluation import proposal_tuning as tuning
from detect.evaluation.recall import greedy_match, match_at_top_ks, proposal_recall, warn_if_low_recall
from detect.proposals.selective_search import selective_search

TINY_GRID = ["--modes", "single", "fast", "--resizes", "160", "--k-scales", "1", "0.5", "--min-sizes", "4", "8"]


class DictStore:
    def __init__(self, boxes: dict):
        self.boxes = boxes

    def get(self, image_id):
        return self.boxes[image_id]


def test_matching_only_overlapping_proposals_changes_no_recall_at_0_5_and_above():
    rng = np.random.default_rng(0)
    gt = np.array([[10, 10, 40, 40], [30, 30, 70, 60], [5, 50, 25, 90], [60, 5, 95, 35]], np.float32)
    xy = rng.uniform(0, 80, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 45, (300, 2))], 1).astype(np.float32)
    iou = box_iou(boxes, gt)  # [R, G]
    for k, (matched, best) in match_at_top_ks(boxes, gt, [5, 10, 100, 0]).items():
        every = greedy_match(iou[:k] if k else iou)  # greedy matching of every proposal
        for t in (0.5, 0.7, 0.95):
            np.testing.assert_array_equal(matched >= t, every >= t)
        np.testing.assert_array_equal(best, (iou[:k] if k else iou).max(axis=0))
    under = greedy_match(iou[:10])
    assert ((under > 0) & (under < 0.5)).any()  # GT boxes matched under 0.5, which the cut leaves unmatched


def test_tune_proposals_cli_choice_is_what_propose_gives(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "proposals.yaml"
    args = ["tune-proposals", "--data", str(synthetic_dir / "train.json"), "--out", str(out),
            "--num-images", "2", "--probe-images", "1", "--target-recall", "0.6", *TINY_GRID]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "reached by the cheapest setting" in printed
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["reached"] and result["sample"] == 2 and out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| ranking |" in out.with_suffix(".md").read_text()
    chosen = result["chosen"]
    assert chosen["recall@0.5"] >= 0.6 and 0 < chosen["top_k"] <= 2000
    # the cheapest: no measured setting reaching the target has a faster search, or as fast with fewer boxes
    reaching = [r for r in result["rows"] if r["recall@0.5"] >= 0.6 and 0 < r["top_k"] <= 2000]
    assert min(tuning.cost(r) for r in reaching) == tuning.cost(chosen)
    # the YAML is a config, and `selective_search` with it gives the measured recall
    settings = to_dict(load_config(out).proposals)
    assert settings == result["settings"] and settings["resize"] == 160
    dataset = load_coco(synthetic_dir / "train.json")
    sample = tuning.sample_records(dataset.records, 2, 0)
    store = DictStore({r.image_id: selective_search(read_image(r.file_name), **check_proposal_settings(settings))
                       for r in sample})
    recall = proposal_recall(Dataset("s", sample, dataset.class_names, dataset.category_ids), store,
                             top_ks=[settings["top_k"]])
    assert recall["recall@0.5"][0] == pytest.approx(chosen["recall@0.5"])
    assert recall["MABO"][0] == pytest.approx(chosen["MABO"])

    # a killed run: some cached searches lost -> recomputed, the same choice; the rest reused
    cached = sorted((tmp_path / "proposals.yaml.cache").rglob("*.npz"))
    assert cached
    cached[0].unlink()
    assert main(args) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["settings"] == result["settings"]
    # another sample in the same cache folder is refused, naming the folder
    assert main([*args[:-len(TINY_GRID)], "--num-images", "3", *TINY_GRID]) == 2
    assert "proposals.yaml.cache" in capsys.readouterr().err


def test_unreachable_target_says_by_how_much(synthetic_dir, tmp_path):
    dataset = load_coco(synthetic_dir / "train.json")
    grid = tuning.Grid(modes=("single",), resizes=(120,), k_scales=(1.0,), min_sizes=(4,), budgets=(1,))
    result = tuning.tune(dataset.records, base=to_dict(load_config(None).proposals), cache_dir=tmp_path / "c",
                         grid=grid, num_images=2, target_recall=1.0, max_boxes=1, probe_images=1, progress=False)
    assert not result["reached"] and result["chosen"]["top_k"] == 1
    assert result["shortfall"] == pytest.approx(1.0 - result["chosen"]["recall@0.5"]) and result["shortfall"] > 0
    assert "NOT reached" in tuning.summary_line(result) and f"{result['shortfall']:.3f}" in tuning.summary_line(result)


def test_low_recall_warning(tiny_coco, capsys):
    json_path, image_dir = tiny_coco
    dataset = load_coco(json_path, image_dir)
    perfect = DictStore({r.image_id: r.gt_boxes for r in dataset.records})
    assert warn_if_low_recall(dataset, perfect, 300) is None
    shifted = DictStore({r.image_id: r.gt_boxes + 25 for r in dataset.records})
    message = warn_if_low_recall(dataset, shifted, 300, {"path": "train.json", "format": "coco"})
    assert message and "recall@0.5 is 0.00 at top_k 300" in message
    assert "detect tune-proposals --data train.json" in message
    assert message in capsys.readouterr().err
    # top_k counts: the good boxes come after the shifted ones, so top_k 1 misses them, all (0) finds them
    two = DictStore({r.image_id: np.concatenate([r.gt_boxes + 25, r.gt_boxes]) for r in dataset.records})
    assert warn_if_low_recall(dataset, two, 1) and warn_if_low_recall(dataset, two, 0) is None


def test_recall_command_warns(tiny_coco, tmp_path, capsys):
    from detect.proposals.store import write_store

    json_path, image_dir = tiny_coco
    dataset = load_coco(json_path, image_dir)
    write_store(tmp_path / "store", image_ids=[r.image_id for r in dataset.records],
                boxes_per_image=[r.gt_boxes + 25 for r in dataset.records],
                meta={"failures": []}, files=[r.file_name for r in dataset.records])
    assert main(["recall", "--data", str(json_path), "--images", str(image_dir), "--proposals",
                 str(tmp_path / "store"), "--top-k", "300"]) == 0
    err = capsys.readouterr().err
    assert "recall@0.5 is 0.00 at top_k 300" in err and f"tune-proposals --data {json_path}" in err


def test_propose_command_warns(tiny_coco, tmp_path, capsys):
    json_path, image_dir = tiny_coco
    args = ["propose", "--data", str(json_path), "--images", str(image_dir), "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "one"), "proposals.resize=0", "proposals.top_k=1"]) == 0
    assert "at top_k 1" in capsys.readouterr().err  # one box per image cannot cover two objects
    assert main([*args, "--out", str(tmp_path / "all"), "proposals.resize=0", "proposals.min_size=4",
                 "proposals.top_k=0"]) == 0
    assert "warning" not in capsys.readouterr().err  # the flat rectangles are found with all boxes
