"""detect.evaluation.voc: VOC 11-point and all-point AP, checked against hand-computed cases of
py-faster-rcnn voc_eval.py's algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detect.data.datasets import Dataset, ImageRecord
from detect.evaluation.voc import (average_precision, detections_from_results, evaluate_voc_metrics,
                                   format_voc_table)
from detect.models.detector import Detections

A, B, C = [0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 70, 70]


def _record(image_id, boxes, classes, difficult):
    return ImageRecord(image_id=image_id, file_name=f"/x/{image_id}.jpg", width=100, height=100,
                       gt_boxes=np.array(boxes, np.float32).reshape(-1, 4),
                       gt_classes=np.array(classes, np.int64), gt_difficult=np.array(difficult, bool))


def _dets(items):  # [(box, score, label)]
    return Detections(torch.tensor([b for b, _, _ in items], dtype=torch.float32).reshape(-1, 4),
                      torch.tensor([s for _, s, _ in items]), torch.tensor([k for _, _, k in items]))


def test_three_detections_on_two_gt_boxes():
    # recall [.5, .5, 1], precision [1, .5, 2/3] (TP, FP, TP)
    recall, precision = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    # 11-point: t = 0 .. 0.5 (6 points) see precision 1, t = 0.6 .. 1 (5 points) see 2/3
    assert average_precision(recall, precision, "voc07") == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # all-point: envelope 1 on recall (0, .5], 2/3 on (.5, 1]
    assert average_precision(recall, precision, "voc") == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    with pytest.raises(ValueError, match="voc12"):
        average_precision(recall, precision, "voc12")


def _fixture():
    """Class 1 ("cat"): gt A in image 1, gt B in image 2; detections TP .9, FP .8 (IoU exactly
    0.5: not > 0.5), TP .7. Class 2 ("dog"): gt A plus a difficult gt C in image 1; detections
    .95 and .6 on C (ignored), .9 on A (TP), .85 on A again (FP: A is taken). Class 3: no gt."""
    records = [_record(1, [A, A, C], [1, 2, 2], [False, False, True]), _record(2, [B], [1], [False])]
    dataset = Dataset("toy", records, ["cat", "dog", "bird"], [1, 2, 3])
    detections = {
        1: _dets([(A, 0.9, 1), ([0, 0, 10, 20], 0.8, 1), (C, 0.95, 2), (C, 0.6, 2), (A, 0.9, 2), (A, 0.85, 2)]),
        2: _dets([(B, 0.7, 1)]),
    }
    return dataset, detections


def test_per_class_ap_of_a_small_fixture_with_a_difficult_object():
    dataset, detections = _fixture()
    result = evaluate_voc_metrics(dataset, detections)
    voc07, voc = result["voc07"], result["voc"]
    assert voc07["per_class_AP"]["cat"] == pytest.approx(28 / 33)
    assert voc["per_class_AP"]["cat"] == pytest.approx(5 / 6)
    # dog: after ignoring C, TP then FP: recall [1, 1], precision [1, .5] -> AP 1 both ways
    assert voc07["per_class_AP"]["dog"] == pytest.approx(1.0)
    assert voc["per_class_AP"]["dog"] == pytest.approx(1.0)
    assert voc07["per_class_AP"]["bird"] == -1.0  # no gt: n/a, left out of the mean
    assert voc07["mAP"] == pytest.approx((28 / 33 + 1) / 2)
    assert voc["mAP"] == pytest.approx((5 / 6 + 1) / 2)
    assert format_voc_table(voc07, "voc07").splitlines()[-2:] == ["  bird  n/a", f"  mAP   {100 * voc07['mAP']:5.1f}"]
    # C not difficult: it becomes a gt box to find: .95 TP, .9 TP, .85 FP, .6 FP (C taken)
    dataset.records[0].gt_difficult = np.zeros(3, bool)
    dog = evaluate_voc_metrics(dataset, detections)["voc"]["per_class_AP"]["dog"]
    assert dog == pytest.approx(1.0)  # recall .5, 1 at precision 1
    # C dropped from the gt (the wrong way to treat difficult): .95 on C becomes an FP first
    dataset.records[0] = _record(1, [A, A], [1, 2], [False, False])
    assert evaluate_voc_metrics(dataset, detections)["voc"]["per_class_AP"]["dog"] == pytest.approx(0.5)


def test_results_entries_become_the_same_detections():
    dataset, detections = _fixture()
    results = []
    for image_id, d in detections.items():
        for (x1, y1, x2, y2), s, k in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist()):
            results.append({"image_id": image_id, "category_id": dataset.category_ids[k - 1],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    again = detections_from_results(dataset, results)
    for metric in ("voc07", "voc"):
        assert evaluate_voc_metrics(dataset, again)[metric]["per_class_AP"] == pytest.approx(
            evaluate_voc_metrics(dataset, detections)[metric]["per_class_AP"])
