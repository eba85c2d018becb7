"""PASCAL VOC average precision: VOC2007's 11-point AP and VOC2010+'s all-point AP.

The algorithm of rbgirshick/py-faster-rcnn's ``lib/datasets/voc_eval.py`` (``voc_eval``,
``voc_ap``), the port of the VOCdevkit's MATLAB evaluation that fast-rcnn called, per class:

1. its detections over all images, best score first;
2. each is matched to the gt box of its image and class with the highest IoU: IoU > 0.5 makes
   it a true positive when that box is neither difficult nor matched yet, a false positive when
   it was matched, neither when it is difficult; IoU <= 0.5 is a false positive;
3. recall = cumulative TP / non-difficult gt boxes; precision = TP / (TP + FP);
4. ``"voc07"`` averages, over recall 0, 0.1, ..., 1, the highest precision at recall >= t (0 if
   none); ``"voc"`` (VOC2010+) sums the area under the precision envelope where recall changes.

Deliberate differences: plain IoU, without voc_eval.py's ``+ 1`` of 1-based pixels (our boxes
are continuous xyxy, ``detect.data.datasets.load_voc``); a detection on a difficult box is no
precision/recall point (the same AP, without voc_eval.py's 0/0 when one comes first); a class
without non-difficult gt has AP -1 and is left out of the mean; score ties keep the input order.
"""

from __future__ import annotations

import numpy as np
import torch

from detect.common.box_ops import box_iou, xywh_to_xyxy
from detect.data.datasets import Dataset, gt_flags
from detect.evaluation.coco import class_of_category, mean_defined
from detect.models.detector import Detections

METRICS = ("voc07", "voc")


def average_precision(recall: np.ndarray, precision: np.ndarray, metric: str) -> float:
    """AP from cumulative recall [D] and precision [D] (voc_eval.py ``voc_ap``)."""
    if metric == "voc07":  # precision is >= 0: max(initial=0.0) is 0 only where no recall reaches t
        return float(sum(precision[recall >= t].max(initial=0.0) / 11.0 for t in np.arange(0.0, 1.1, 0.1)))
    if metric == "voc":
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the precision envelope
        changes = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))
    raise ValueError(f"unknown VOC metric {metric!r}: expected one of {METRICS}")


def class_pr(dets: list[tuple[float, int, np.ndarray]],
             gt: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Recall [D'] and precision [D'] of one class (steps 1-3 above; D' leaves out detections on
    difficult boxes) and its non-difficult gt count. ``dets``: (score, image id, box [4]) of each
    detection of the class; ``gt``: image id -> (boxes [G, 4], difficult [G]) of that class."""
    num_pos = int(sum((~difficult).sum() for _, difficult in gt.values()))
    order = np.argsort([-d[0] for d in dets], kind="stable")
    matched = {image_id: np.zeros(len(boxes), bool) for image_id, (boxes, _) in gt.items()}
    tp = []  # per counted detection; the others are false positives
    for i in order:
        _, image_id, box = dets[i]
        boxes, difficult = gt.get(image_id, (np.zeros((0, 4), np.float32), np.zeros(0, bool)))
        if len(boxes):
            ious = box_iou(box, boxes)[0]  # [G]
            j = int(np.argmax(ious))
            if ious[j] > 0.5:
                if difficult[j]:
                    continue  # neither TP nor FP
                tp.append(not matched[image_id][j])
                matched[image_id][j] = True
                continue
        tp.append(False)
    tp_cum = np.cumsum(np.asarray(tp, np.float64))
    precision = tp_cum / np.arange(1, len(tp) + 1)  # TP + FP: the detections counted so far
    return tp_cum / max(num_pos, 1), precision, num_pos


def evaluate_voc_metrics(dataset: Dataset, detections: dict[int, Detections]) -> dict[str, dict]:
    """``{metric: {"mAP", "per_class_AP": {class name: AP}}}`` of ``detections`` (image id ->
    ``Detections``, labels 1..K) on ``dataset`` for each of ``METRICS``; -1 where undefined."""
    per_class: dict[str, dict[str, float]] = {m: {} for m in METRICS}
    arrays = [(image_id, d.labels.cpu().numpy(), d.scores.cpu().numpy(), d.boxes.cpu().numpy())
              for image_id, d in detections.items()]
    gt_arrays = [(r.image_id, np.asarray(r.gt_classes).reshape(-1), np.asarray(r.gt_boxes).reshape(-1, 4),
                  gt_flags(r.gt_difficult, len(r.gt_classes))) for r in dataset.records]
    for k, name in enumerate(dataset.class_names, start=1):
        gt = {image_id: (boxes[classes == k], difficult[classes == k])
              for image_id, classes, boxes, difficult in gt_arrays}
        dets = [(float(s), image_id, b) for image_id, labels, scores, boxes in arrays
                for s, b in zip(scores[labels == k], boxes[labels == k])]
        recall, precision, num_pos = class_pr(dets, gt)
        for m in METRICS:
            per_class[m][name] = average_precision(recall, precision, m) if num_pos else -1.0
    return {m: {"mAP": mean_defined(list(per_class[m].values())), "per_class_AP": per_class[m]} for m in METRICS}


def detections_from_results(dataset: Dataset, results: list[dict]) -> dict[int, Detections]:
    """COCO results entries -> image id -> ``Detections`` (float64, classes 1..K), in file order;
    entries of a category not in ``dataset`` are left out."""
    class_of = class_of_category(dataset.category_ids)
    grouped: dict[int, list[dict]] = {}
    for entry in results:
        if entry.get("category_id") in class_of:
            grouped.setdefault(entry["image_id"], []).append(entry)
    return {image_id: Detections(torch.from_numpy(xywh_to_xyxy(np.array([e["bbox"] for e in entries], np.float64))),
                                 torch.from_numpy(np.array([e["score"] for e in entries], np.float64)),
                                 torch.tensor([class_of[e["category_id"]] for e in entries]))
            for image_id, entries in grouped.items()}


def format_voc_table(result: dict, metric: str) -> str:
    """Per-class AP and the mean, in percent, as a text table."""
    title = {"voc07": "VOC2007 11-point AP", "voc": "VOC2010+ all-point AP"}[metric]
    width = max([len(n) for n in result["per_class_AP"]] + [3])
    lines = [f"  {name:<{width}}  {'n/a' if ap < 0 else f'{100 * ap:5.1f}'}"
             for name, ap in [*result["per_class_AP"].items(), ("mAP", result["mAP"])]]
    return "\n".join([f"{title} (IoU > 0.5, difficult ignored)", *lines])
