"""The TIDE-style error breakdown on hand-built detections: one case per error type.

Two classes. Ground truth: A = [0, 0, 10, 10] and B = [20, 20, 30, 30] of class 1, C = [40,
40, 50, 50] of class 2. The base detections are true positives on A (0.8), B (0.3) and C (0.7);
each case adds one error detection at score 0.9 (or removes one true positive).
"""

from __future__ import annotations

import numpy as np
import pytest

from detect.evaluation.matching import ERROR_TYPES, classify_detections, error_breakdown, per_image_ap50
from detect.evaluation.matching import ImageBoxes

GT = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], float)
GT_CLASSES = np.array([1, 1, 2])
BASE = [([0, 0, 10, 10], 1, 0.8), ([20, 20, 30, 30], 1, 0.3), ([40, 40, 50, 50], 2, 0.7)]


def ap101(flags: list[int], num_pos: int) -> float:
    """A plain reference: COCO's 101-point interpolated AP of TP/FP flags in score order."""
    tp = fp = 0
    points = []
    for f in flags:
        tp, fp = tp + f, fp + (1 - f)
        points.append((tp / num_pos, tp / (tp + fp)))
    total = 0.0
    for r in np.linspace(0, 1, 101):
        total += max([p for rc, p in points if rc >= r - 1e-12], default=0.0)
    return total / 101


def breakdown(dets):
    boxes = np.array([d[0] for d in dets], float).reshape(-1, 4)
    im = ImageBoxes(GT, GT_CLASSES, np.zeros(3, bool), boxes, np.array([d[2] for d in dets]),
                    np.array([d[1] for d in dets]))
    return error_breakdown([im], 2)


def only(result, error, cost):
    assert result["dAP50"][error] == pytest.approx(cost)
    for other in ERROR_TYPES:
        if other != error:
            assert result["dAP50"][other] == pytest.approx(0.0), other
    assert result["counts"][error] == 1


def test_classification_error_on_a_taken_box_and_on_a_free_box():
    r = breakdown(BASE + [([0, 0, 10, 10], 2, 0.9)])  # class 2 on A, which the 0.8 detection took
    assert r["AP50"] == pytest.approx((1.0 + ap101([0, 1], 1)) / 2)
    only(r, "classification", 1.0 - r["AP50"])
    r = breakdown(BASE[1:] + [([0, 0, 10, 10], 2, 0.9)])  # A is free: the fix makes it a TP of class 1
    assert r["AP50"] == pytest.approx((ap101([1], 2) + ap101([0, 1], 1)) / 2)
    assert r["dAP50"]["classification"] == pytest.approx(1.0 - r["AP50"])
    assert r["counts"]["missed"] == 0  # A is the classification error's box, not missed


def test_localisation_error():
    r = breakdown(BASE + [([0, 0, 10, 4], 1, 0.9)])  # IoU 0.4 with A
    assert r["AP50"] == pytest.approx((ap101([0, 1, 1], 2) + 1.0) / 2)
    only(r, "localisation", 1.0 - r["AP50"])


def test_both_error():
    r = breakdown(BASE + [([0, 0, 10, 4], 2, 0.9)])  # class 2, IoU 0.4 with A (class 1)
    only(r, "both", 1.0 - (1.0 + ap101([0, 1], 1)) / 2)


def test_duplicate_error():
    r = breakdown(BASE + [([0, 0, 10, 10], 1, 0.9)])  # takes A; the 0.8 detection is the duplicate
    assert r["AP50"] == pytest.approx((ap101([1, 0, 1], 2) + 1.0) / 2)
    only(r, "duplicate", 1.0 - r["AP50"])


def test_background_error():
    r = breakdown(BASE + [([60, 60, 70, 70], 1, 0.9)])
    only(r, "background", 1.0 - (ap101([0, 1, 1], 2) + 1.0) / 2)


def test_missed_box():
    r = breakdown([BASE[0], BASE[2]])  # nothing on B
    assert r["AP50"] == pytest.approx((ap101([1], 2) + 1.0) / 2)
    only(r, "missed", 1.0 - r["AP50"])


def test_a_detection_on_an_ignored_box_leaves_the_curve_as_pycocotools_does():
    # A crowd box D = [60, 60, 70, 70] of class 1; a 0.95 detection on it is "ignored", not a
    # false positive: AP50 stays the base detections' 1.0.
    gt = np.concatenate([GT, [[60, 60, 70, 70]]])
    dets = BASE + [([60, 60, 70, 70], 1, 0.95)]
    im = ImageBoxes(gt, np.array([1, 1, 2, 1]), np.array([False, False, False, True]),
                    np.array([d[0] for d in dets], float), np.array([d[2] for d in dets]),
                    np.array([d[1] for d in dets]))
    r = error_breakdown([im], 2)
    assert r["AP50"] == pytest.approx(1.0)
    assert r["counts"]["background"] == 0 and r["counts"]["missed"] == 0


def test_per_image_ap50_and_each_detections_index():
    one = ImageBoxes(GT, GT_CLASSES, np.zeros(3, bool), np.array([d[0] for d in BASE], float),
                     np.array([d[2] for d in BASE]), np.array([d[1] for d in BASE]))
    bad = ImageBoxes(GT, GT_CLASSES, np.zeros(3, bool), np.array([[60, 60, 70, 70]], float),
                     np.array([0.9]), np.array([1]))
    empty = ImageBoxes(np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, bool),
                       np.array([[0, 0, 5, 5]], float), np.array([0.5]), np.array([2]))
    dets, _, _ = classify_detections([one, bad, empty], 2)
    assert per_image_ap50(dets, [one, bad, empty], 2) == [pytest.approx(1.0), 0.0, None]
    for e in dets:  # each entry names its box
        im = [one, bad, empty][e["image"]]
        assert im.labels[e["index"]] == e["label"] and im.scores[e["index"]] == e["score"]
