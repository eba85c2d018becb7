"""Where AP50 goes: an error breakdown in the manner of TIDE (Bolya et al., ECCV 2020).

Not the ``tidecv`` package (it pulls in opencv-python, pandas and seaborn), but the paper's
definitions at foreground IoU t_f = 0.5 and background IoU t_b = 0.1: after COCO's matching at
t_f (``matching.match_detections``), each false positive gets one type, in this order:

- classification: IoU >= t_f with a ground-truth box of another class;
- duplicate: IoU >= t_f with a box of its class that a higher-scoring detection took;
- localisation: t_b <= IoU < t_f with a box of its class;
- both: t_b <= IoU < t_f with a box of another class;
- background: IoU < t_b with every box.

A gt box no detection matched and no classification or localisation error points at is
**missed**. A type's cost, dAP50, is AP50 after an oracle fixes that type alone, minus AP50: a
classification (localisation) error becomes a true positive of its box's class (with its box)
when that box is still free, in score order, and is removed otherwise; both, duplicate and
background errors are removed; missed boxes are dropped from the ground truth.
"""

from __future__ import annotations

import numpy as np

from detect.common.box_ops import box_iou
from detect.evaluation.matching import ImageBoxes, MatchTable, average_precision, class_order, match_detections

ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
FG_IOU, BG_IOU = 0.5, 0.1  # t_f and t_b


def classify_detections(images: list[ImageBoxes],
                        num_classes: int) -> tuple[list[dict], np.ndarray, list[tuple[int, int]]]:
    """Every kept detection as {image, index, label, score, type, target}: index into its
    image's ``boxes``; type "tp", an error type or "ignored" (matched to a crowd / difficult
    box); target (image, gt index) for tp/classification/localisation. Also the non-ignored
    gt count per class [K] and the missed boxes [(image, gt index)]."""
    dets, num_pos, missed = [], np.zeros(num_classes, np.int64), []
    for i, im in enumerate(images):
        ignore = np.asarray(im.gt_ignore, bool)
        num_pos += np.bincount(np.asarray(im.gt_classes, np.int64)[~ignore], minlength=num_classes + 1)[1:]
        ious = box_iou(im.boxes, im.gt_boxes)  # [D, G]
        first = len(dets)
        for k in np.unique(im.labels).tolist():  # the classes it detected
            d, gt_k = class_order(im, k)
            iou_same = np.where((im.gt_classes == k) & ~ignore, ious, 0.0)  # [D, G]
            iou_other = np.where((im.gt_classes != k) & ~ignore, ious, 0.0)  # [D, G]
            for j, m in zip(d, match_detections(ious[np.ix_(d, gt_k)], ignore[gt_k], FG_IOU)):
                entry = {"image": i, "index": int(j), "label": k, "score": float(im.scores[j]), "target": None}
                best_same, best_other = iou_same[j].max(initial=0.0), iou_other[j].max(initial=0.0)
                if m > -1:
                    entry.update(type="ignored" if ignore[gt_k[m]] else "tp", target=(i, int(gt_k[m])))
                elif best_other >= FG_IOU:
                    entry.update(type="classification", target=(i, int(iou_other[j].argmax())))
                elif best_same >= FG_IOU:
                    entry.update(type="duplicate")
                elif best_same >= BG_IOU:
                    entry.update(type="localisation", target=(i, int(iou_same[j].argmax())))
                else:
                    entry.update(type="both" if best_other >= BG_IOU else "background")
                dets.append(entry)
        targeted = {e["target"][1] for e in dets[first:] if e["target"] is not None}
        missed += [(i, int(g)) for g in np.flatnonzero(~ignore) if g not in targeted]
    return dets, num_pos, missed


def _ap50(dets: list[dict], num_pos: np.ndarray) -> float:
    """COCO's AP50 (``average_precision``) of classified detections, with ``num_pos`` [K]."""
    flags = np.array([{"tp": 1, "ignored": -1}.get(e["type"], 0) for e in dets], np.int8).reshape(-1, 1)
    table = MatchTable(np.zeros(len(dets), np.int64), np.array([e["label"] for e in dets], np.int64),
                       np.array([e["score"] for e in dets], np.float64), flags, num_pos[None, :], (0.5,))
    return average_precision(table)[0.5]


def per_image_ap50(dets: list[dict], images: list[ImageBoxes], num_classes: int) -> list[float | None]:
    """AP50 of each image alone (``classify_detections``' entries; mean over the classes with
    ground truth in that image), None for an image without ground truth."""
    by_image: list[list[dict]] = [[] for _ in images]
    for e in dets:
        by_image[e["image"]].append(e)
    out = []
    for im, mine in zip(images, by_image):
        counted = np.asarray(im.gt_classes, np.int64)[~np.asarray(im.gt_ignore, bool)]
        num_pos = np.bincount(counted, minlength=num_classes + 1)[1:]
        out.append(_ap50(mine, num_pos) if num_pos.any() else None)
    return out


def _fix(dets: list[dict], error: str, images: list[ImageBoxes]) -> list[dict]:
    fixed = [e for e in dets if e["type"] != error]
    if error in ("both", "duplicate", "background"):
        return fixed
    taken = {e["target"] for e in dets if e["type"] == "tp"}
    for e in sorted((e for e in dets if e["type"] == error), key=lambda e: -e["score"]):
        if e["target"] in taken:
            continue  # the box is taken: the fixed detection would be a duplicate, so it goes
        taken.add(e["target"])
        i, g = e["target"]
        fixed.append(dict(e, type="tp", label=int(images[i].gt_classes[g])))
    return fixed


def error_breakdown(images: list[ImageBoxes], num_classes: int) -> dict:
    """{"AP50", "dAP50": {type: cost}, "counts": {type: n}} (see the module docstring)."""
    dets, num_pos, missed = classify_detections(images, num_classes)
    base = _ap50(dets, num_pos)
    d_ap = {error: _ap50(_fix(dets, error, images), num_pos) - base for error in ERROR_TYPES[:-1]}
    missed_classes = np.array([images[i].gt_classes[g] - 1 for i, g in missed], np.int64)  # [M] 0..K-1
    pos = num_pos - np.bincount(missed_classes, minlength=len(num_pos))
    d_ap["missed"] = _ap50(dets, pos) - base if (pos > 0).any() else 0.0
    counts = {t: sum(e["type"] == t for e in dets) for t in ERROR_TYPES[:-1]} | {"missed": len(missed)}
    return {"AP50": base, "dAP50": d_ap, "counts": counts, "fg_iou": FG_IOU, "bg_iou": BG_IOU}
