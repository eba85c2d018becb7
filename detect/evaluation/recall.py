"""Proposal recall against the ground truth: recall, average recall and (M)ABO at top-k.

Used by ``detect recall`` and written into every run's metrics.json ("proposal_recall");
``warn_if_low_recall`` is the one warning of ``detect propose``, ``recall`` and ``train``.
"""

from __future__ import annotations

import math
import sys
from typing import Iterable

import numpy as np
from tqdm import tqdm

RECALL_TOP_KS = (100, 300, 1000, 2000)
LOW_RECALL = 0.8  # recall@0.5 under which `detect propose`, `recall` and `train` warn
WARNING_IMAGES = 500  # the warning measures recall on at most this many images (evenly spread)
IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)  # COCO's 0.5:0.95, for average recall


def proposal_recall(dataset, store, top_ks: Iterable[int] = RECALL_TOP_KS, progress: bool = False) -> dict:
    """Recall of the proposals against the ground truth, at several numbers of proposals.

    For each k of ``top_ks`` the first k proposals of every image (selective search's ranking)
    are compared with its ground truth (difficult / crowd boxes, ``gt_difficult``, are ignored):
    - "recall@0.5", "recall@0.7": fraction of GT boxes covered at that IoU; each proposal covers
      at most one GT box, matched greedily from the highest IoU down (detectron2
      ``_eval_box_proposals``, fast-rcnn ``imdb.evaluate_recall``). A GT box in an image with no
      proposal counts as missed.
    - "AR": recall averaged over IoU 0.5:0.95 (step 0.05), the same matching.
    - "ABO": mean over GT boxes of the best IoU of any proposal (no one-to-one matching).
    - "MABO": [SS]'s mean ABO: the ABO of each class, averaged over classes with GT.
    - "avg_proposals": mean number of proposals per image actually used (min(k, R)).
    Returns {"top_k": [T], metric: [T] floats}: the ``proposal_recall`` block of metrics.json
    (detect.report). A metric with no GT box to measure is -1 (n/a).
    """
    top_ks = sorted({int(k) for k in top_ks})
    if not top_ks or top_ks[0] < 1:
        raise ValueError(f"proposal_recall: top_ks must be positive, got {top_ks}")
    if hasattr(store, "check_dataset"):
        store.check_dataset(dataset)
    matched = {k: [] for k in top_ks}  # k -> [G_i] matched IoU per GT box (0 = unmatched)
    best = {k: [] for k in top_ks}  # k -> [G_i] best IoU per GT box
    used = {k: [] for k in top_ks}  # k -> number of proposals used per image
    gt_classes = []
    for record in tqdm(dataset.records, desc="recall", unit="img", disable=None if progress else True):
        proposal_boxes = store.get(record.image_id)[:top_ks[-1]]  # [R, 4]
        for k in top_ks:
            used[k].append(min(k, len(proposal_boxes)))
        gt_boxes, classes = counted_gt(record)  # [G, 4], [G]
        if len(gt_boxes) == 0:
            continue
        gt_classes.append(classes)
        iou = box_iou_float64(proposal_boxes, gt_boxes)  # [R, G]
        for k in top_ks:
            iou_k = iou[:k]  # [min(k, R), G]
            best[k].append(iou_k.max(axis=0) if len(iou_k) else np.zeros(len(gt_boxes)))
            matched[k].append(greedy_match(iou_k))

    classes = np.concatenate(gt_classes) if gt_classes else np.zeros(0, np.int64)  # [G_total]
    result: dict[str, list] = {"top_k": top_ks}
    for k in top_ks:
        m = np.concatenate(matched[k]) if matched[k] else np.zeros(0)  # [G_total]
        b = np.concatenate(best[k]) if best[k] else np.zeros(0)  # [G_total]
        recalls = [float((m >= t).mean()) if len(m) else -1.0 for t in IOU_THRESHOLDS]
        class_abo = [b[classes == c].mean() for c in np.unique(classes)]
        result.setdefault("recall@0.5", []).append(recalls[0])
        result.setdefault("recall@0.7", []).append(recalls[4])
        result.setdefault("AR", []).append(float(np.mean(recalls)) if len(m) else -1.0)
        result.setdefault("ABO", []).append(float(b.mean()) if len(b) else -1.0)
        result.setdefault("MABO", []).append(float(np.mean(class_abo)) if class_abo else -1.0)
        result.setdefault("avg_proposals", []).append(float(np.mean(used[k])) if used[k] else 0.0)
    return result


def warn_if_low_recall(dataset, store, top_k: int, data_spec: dict | None = None) -> str | None:
    """The one warning of ``detect propose`` (for a split with boxes), ``detect recall`` and
    ``detect train``: when recall@0.5 of the first ``top_k`` proposals (0 = all) is below
    ``LOW_RECALL``, print one line with the figure and the fix to stderr and return it; None
    when recall is fine or there is no box to measure. Measured on at most ``WARNING_IMAGES``
    images, evenly spread. ``data_spec`` (``DatasetConfig`` as a dict) names the data in the
    suggested ``detect tune-proposals`` command."""
    records = [r for r in dataset.records if len(counted_gt(r)[0])]
    if not records:
        return None
    step = max(1, math.ceil(len(records) / WARNING_IMAGES))
    subset = type(dataset)(dataset.name, records[::step], dataset.class_names, dataset.category_ids)
    recall = proposal_recall(subset, store, top_ks=[top_k if top_k > 0 else 10 ** 9])["recall@0.5"][0]
    if recall >= LOW_RECALL:
        return None
    spec = data_spec or {"path": "TRAIN", "format": "coco"}
    data = spec["path"] + (f" --format voc --split {spec.get('split', '')}" if spec["format"] == "voc" else "")
    message = (f"warning: proposal recall@0.5 is {recall:.2f} at {f'top_k {top_k}' if top_k > 0 else 'all proposals'}"
               f" ({len(subset)} images): no detector can find more of the objects than that. Run `detect "
               f"tune-proposals --data {data} --out proposals.yaml` to choose proposal settings for this data")
    print(message, file=sys.stderr)
    return message


def box_iou_float64(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU [A, B] of xyxy boxes [A, 4] and [B, 4], in float64. (detect.boxes.box_iou_numpy goes
    through torch; this module stays torch-free so that workers and `detect recall` start fast.)"""
    boxes1 = boxes1.astype(np.float64)[:, None, :]  # [A, 1, 4]
    boxes2 = boxes2.astype(np.float64)[None, :, :]  # [1, B, 4]
    inter_w = (np.minimum(boxes1[..., 2], boxes2[..., 2]) - np.maximum(boxes1[..., 0], boxes2[..., 0])).clip(0)
    inter_h = (np.minimum(boxes1[..., 3], boxes2[..., 3]) - np.maximum(boxes1[..., 1], boxes2[..., 1])).clip(0)
    inter = inter_w * inter_h  # [A, B]
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])  # [A, 1]
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])  # [1, B]
    union = area1 + area2 - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def best_proposals(proposal_boxes: np.ndarray, gt_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each GT box, the proposal of highest IoU (ABO's best overlap, no one-to-one
    matching): its index [G] (-1 when there is no proposal) and that IoU [G]."""
    iou = box_iou_float64(np.asarray(proposal_boxes).reshape(-1, 4), np.asarray(gt_boxes).reshape(-1, 4))  # [R, G]
    if iou.shape[0] == 0:
        return np.full(iou.shape[1], -1, np.int64), np.zeros(iou.shape[1])
    return iou.argmax(axis=0), iou.max(axis=0)


def first_covering(proposal_boxes: np.ndarray, gt_boxes: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """For each GT box [G], the rank of the first proposal (selective search's order) with IoU
    >= ``iou``, or -1: the top k proposals cover a box when 0 <= rank < k."""
    ious = box_iou_float64(np.asarray(proposal_boxes).reshape(-1, 4), np.asarray(gt_boxes).reshape(-1, 4))  # [R, G]
    covered = ious >= iou
    return np.where(covered.any(axis=0), covered.argmax(axis=0), -1)


def counted_gt(record) -> tuple[np.ndarray, np.ndarray]:
    """The GT boxes [G, 4] xyxy and classes [G] that recall counts: all but difficult / crowd."""
    gt_boxes = np.asarray(record.gt_boxes, dtype=np.float32).reshape(-1, 4)
    gt_classes = np.asarray(record.gt_classes, dtype=np.int64).reshape(-1)
    difficult = np.asarray(record.gt_difficult, dtype=bool).reshape(-1)
    if len(difficult) == 0:  # ImageRecord's default: no flags given, none difficult
        difficult = np.zeros(len(gt_boxes), dtype=bool)
    if len(difficult) != len(gt_boxes) or len(gt_classes) != len(gt_boxes):
        raise ValueError(f"image {record.image_id} ({record.file_name}): {len(gt_boxes)} GT boxes but "
                         f"{len(gt_classes)} classes and {len(difficult)} difficult flags")
    return gt_boxes[~difficult], gt_classes[~difficult]


def greedy_match(iou: np.ndarray) -> np.ndarray:
    """[R, G] IoU -> [G] IoU of each GT box's proposal under greedy one-to-one matching (0 = none)."""
    iou = iou.copy()
    out = np.zeros(iou.shape[1], dtype=np.float64)  # [G]
    for _ in range(min(iou.shape)):
        r, g = np.unravel_index(int(np.argmax(iou)), iou.shape)
        if iou[r, g] < 0:
            break
        out[g] = iou[r, g]
        iou[r, :] = -1.0
        iou[:, g] = -1.0
    return out


def format_recall_table(recall: dict) -> str:
    """The ``proposal_recall`` result as a text table, one row per top-k."""
    keys = ["avg_proposals", "recall@0.5", "recall@0.7", "AR", "ABO", "MABO"]
    header = f"{'top-k':>6}  " + "  ".join(f"{k:>13}" for k in keys)
    rows = [header]
    for i, k in enumerate(recall["top_k"]):
        cells = [f"{recall[key][i]:13.1f}" if key == "avg_proposals" else f"{recall[key][i]:13.4f}" for key in keys]
        rows.append(f"{k:>6}  " + "  ".join(cells))
    return "\n".join(rows)
