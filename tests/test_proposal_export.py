"""Proposal ranking values in the store, and the detectron2 / mmdetection export files."""

from __future__ import annotations

import pickle

import numpy as np
from PIL import Image

from detect.cli import main
from detect.proposals.selective_search import selective_search
from detect.proposals.store import ProposalStore, export_proposals, write_store


def _store(tmp_path, with_scores: bool):
    boxes = [np.array([[0, 0, 10, 10], [2, 2, 8, 9]], np.float32), np.zeros((0, 4), np.float32),
             np.array([[1, 1, 5, 5]], np.float32)]
    scores = [np.array([0.25, 1.5], np.float32), np.zeros(0, np.float32), np.array([3.0], np.float32)]
    items = list(zip(boxes, scores)) if with_scores else boxes
    path = write_store(tmp_path / f"store{int(with_scores)}", image_ids=[7, 3, 9], boxes_per_image=items,
                       meta={"mode": "fast"}, with_scores=with_scores)
    return ProposalStore(path), boxes, scores


def test_store_keeps_ranking_values(tmp_path):
    store, _, scores = _store(tmp_path, with_scores=True)
    np.testing.assert_array_equal(store.scores(7), scores[0])
    assert store.scores(3).shape == (0,)
    np.testing.assert_array_equal(store.scores(9), scores[2])
    plain, _, _ = _store(tmp_path, with_scores=False)  # no ranking values given: the positions
    np.testing.assert_array_equal(plain.scores(7), [0, 1])


def test_detectron2_file_structure(tmp_path):
    store, boxes, scores = _store(tmp_path, with_scores=True)
    assert export_proposals(store, "detectron2", tmp_path / "d2.pkl") == 3
    with open(tmp_path / "d2.pkl", "rb") as f:  # our own file, read back with the standard library
        data = pickle.load(f)
    assert set(data) == {"ids", "boxes", "objectness_logits", "bbox_mode"} and data["bbox_mode"] == 0  # XYXY_ABS
    assert data["ids"] == [7, 3, 9]
    for got, want in zip(data["boxes"], boxes):
        np.testing.assert_array_equal(got, want)
    logits = data["objectness_logits"]
    assert [len(v) for v in logits] == [2, 0, 1]
    np.testing.assert_array_equal(logits[0], -scores[0])
    assert logits[0][0] > logits[0][1]  # the better-ranked box has the higher logit


def test_mmdet_file_structure(tmp_path):
    store, boxes, scores = _store(tmp_path, with_scores=True)
    export_proposals(store, "mmdet", tmp_path / "mm.pkl")
    with open(tmp_path / "mm.pkl", "rb") as f:
        data = pickle.load(f)
    assert isinstance(data, list) and [a.shape for a in data] == [(2, 5), (0, 5), (1, 5)]
    np.testing.assert_array_equal(data[0][:, :4], boxes[0])
    np.testing.assert_allclose(data[0][:, 4], 1 / (1 + scores[0]))
    assert all(a.dtype == np.float32 for a in data)


def test_propose_export_from_the_command_line(tmp_path):
    image = np.zeros((60, 80, 3), np.uint8)
    image[10:40, 20:60] = (200, 30, 30)
    Image.fromarray(image).save(tmp_path / "a.png")
    args = ["propose", "proposals.resize=0", "proposals.min_size=4", "--input", str(tmp_path / "a.png"),
            "--out", str(tmp_path / "store"), "--workers", "1", "--export", "detectron2", str(tmp_path / "p.pkl")]
    assert main(args) == 0
    with open(tmp_path / "p.pkl", "rb") as f:
        data = pickle.load(f)
    boxes, values = selective_search(image, resize=0, min_size=4, return_scores=True)
    assert data["ids"] == [1]
    np.testing.assert_array_equal(data["boxes"][0], boxes)
    np.testing.assert_array_equal(data["objectness_logits"][0], -values)
    assert main(args[:-3] + ["--out", str(tmp_path / "s2"), "--export", "yolo", "x.pkl"]) == 2  # named error
