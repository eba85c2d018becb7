"""AP from per-detection matches against pycocotools, and paired bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from detect.evaluation.coco import evaluate_coco
from detect.evaluation.matching import ImageBoxes, average_precision, bootstrap_ap, match_images


def _random_case(seed: int, num_images: int = 12, num_classes: int = 3):
    rng = np.random.default_rng(seed)
    images, coco_images, anns, results = [], [], [], []
    for i in range(num_images):
        g = int(rng.integers(0, 4))
        xy = rng.uniform(0, 60, (g, 2))
        gt = np.concatenate([xy, xy + rng.uniform(10, 40, (g, 2))], axis=1)
        gcls = rng.integers(1, num_classes + 1, g)
        # Detections: jittered copies of the ground truth (some wrong class) and random boxes.
        jit = gt + rng.normal(0, 4, gt.shape)
        rnd_xy = rng.uniform(0, 60, (3, 2))
        rnd = np.concatenate([rnd_xy, rnd_xy + rng.uniform(5, 40, (3, 2))], axis=1)
        boxes = np.concatenate([jit, jit + rng.normal(0, 2, gt.shape), rnd])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        labels = np.concatenate([gcls, rng.integers(1, num_classes + 1, g), rng.integers(1, num_classes + 1, 3)])
        scores = np.round(rng.uniform(0, 1, len(boxes)), 6)
        images.append(ImageBoxes(gt, gcls, np.zeros(g, bool), boxes, scores, labels))
        coco_images.append({"id": i + 1, "width": 100, "height": 100, "file_name": f"{i}.png"})
        for b, c in zip(gt, gcls):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c), "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": float((b[2] - b[0]) * (b[3] - b[1]))})
        for b, c, s in zip(boxes, labels, scores):
            results.append({"image_id": i + 1, "category_id": int(c), "score": float(s),
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    gt = {"images": coco_images, "annotations": anns,
          "categories": [{"id": k, "name": str(k)} for k in range(1, num_classes + 1)]}
    return images, gt, results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_from_matches_equals_pycocotools(seed):
    images, gt, results = _random_case(seed)
    coco = evaluate_coco(gt, results)
    ours = average_precision(match_images(images, 3))
    assert ours[0.5] == pytest.approx(coco["AP50"], abs=1e-9)
    assert ours[0.75] == pytest.approx(coco["AP75"], abs=1e-9)


def test_weights_equal_repeating_images():
    images, _, _ = _random_case(3, num_images=5)
    weights = np.array([2, 0, 1, 3, 1])
    repeated = [im for im, w in zip(images, weights) for _ in range(w)]
    a = average_precision(match_images(images, 3), weights)
    b = average_precision(match_images(repeated, 3))
    assert a == pytest.approx(b)


def test_identical_detectors_have_a_difference_interval_of_zero_and_intervals_bracket_ap():
    images, _, _ = _random_case(4, num_images=20)
    table = match_images(images, 3)
    boot = bootstrap_ap([table, table], num_resamples=200)
    for thr in (0.5, 0.75):
        d = boot["diff_to_first"][1][thr]
        assert d["lo"] <= 0.0 <= d["hi"] and d["value"] == 0.0
        ap = boot["ap"][0][thr]
        assert ap["lo"] <= ap["value"] <= ap["hi"] and ap["hi"] > ap["lo"]
    # A detector whose boxes are all shifted 30 px is worse, and the interval says so.
    worse = [ImageBoxes(im.gt_boxes, im.gt_classes, im.gt_ignore, im.boxes + 30, im.scores, im.labels)
             for im in images]
    boot = bootstrap_ap([table, match_images(worse, 3)], num_resamples=200)
    assert boot["diff_to_first"][1][0.5]["hi"] < 0


def test_ap_per_iou_holds_ap50_ap75_and_averages_to_ap():
    images, gt, results = _random_case(5)
    m = evaluate_coco(gt, results)
    curve = m["ap_per_iou"]
    assert curve["iou"] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    assert curve["AP"][0] == pytest.approx(m["AP50"]) and curve["AP"][5] == pytest.approx(m["AP75"])
    assert np.mean(curve["AP"]) == pytest.approx(m["AP"])
    ours = average_precision(match_images(images, 3, iou_thresholds=tuple(curve["iou"])))
    assert [ours[t] for t in curve["iou"]] == pytest.approx(curve["AP"])


def test_drop_from_ap50_to_ap75_and_its_paired_difference():
    images, _, _ = _random_case(6, num_images=15)
    table = match_images(images, 3)
    ap = average_precision(table)
    boot = bootstrap_ap([table, table], num_resamples=100)
    assert boot["drop"][0]["value"] == pytest.approx(ap[0.5] - ap[0.75])
    d = boot["drop_diff_to_first"][1]
    assert d["value"] == 0.0 and d["lo"] == 0.0 and d["hi"] == 0.0  # paired: identical draws
