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

from detect.common.box_ops import box_iou
from detect.data.datasets import gt_flags

RECALL_TOP_KS = (100, 300, 1000, 2000)
LOW_RECALL = 0.8  # recall@0.5 under which `detect propose`, `recall` and `train` warn
WARNING_IMAGES = 500  # the warning measures recall on at most this many images (evenly spread)
IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)  # COCO's 0.5:0.95, for average recall


def proposal_recall(dataset, store, top_ks: Iterable[int] = RECALL_TOP_KS, progress: bool = False) -> dict:
    """Recall of the first k proposals of every image against its GT, for each k of ``top_ks``.

    Difficult / crowd boxes are ignored. "recall@0.5", "recall@0.7": the fraction of GT boxes
    covered at that IoU, each proposal covering at most one, matched greedily from the highest
    IoU down (detectron2's ``_eval_box_proposals``, fast-rcnn's ``imdb.evaluate_recall``); "AR":
    that recall averaged over IoU 0.5:0.95; "ABO": the mean best IoU of a GT box (no one-to-one
    matching); "MABO" ([SS]): ABO averaged over classes; "avg_proposals": mean min(k, R). Returns
    {"top_k": [T], metric: [T]}, metrics.json's "proposal_recall"; -1 where there is no GT box.
    """
    top_ks = sorted({int(k) for k in top_ks})
    if not top_ks or top_ks[0] < 1:
        raise ValueError(f"proposal_recall: top_ks must be positive, got {top_ks}")
    if hasattr(store, "check_dataset"):
        store.check_dataset(dataset)
    matches = {k: [] for k in top_ks}  # k -> (matched IoU [G_i], best IoU [G_i]) per image
    counts = []  # proposals per image (at most the largest k)
    gt_classes = []
    for record in tqdm(dataset.records, desc="recall", unit="img", disable=None if progress else True):
        proposal_boxes = store.get(record.image_id)[:top_ks[-1]]  # [R, 4]
        counts.append(len(proposal_boxes))
        gt_boxes, classes = counted_gt(record)  # [G, 4], [G]
        if len(gt_boxes):
            gt_classes.append(classes)
            for k, match in match_at_top_ks(proposal_boxes, gt_boxes, top_ks).items():
                matches[k].append(match)
    classes = np.concatenate(gt_classes) if gt_classes else np.zeros(0, np.int64)  # [G_total]
    summaries = [{**recall_summary(matches[k], classes),
                  "avg_proposals": float(np.mean(np.minimum(counts, k))) if counts else 0.0} for k in top_ks]
    return {"top_k": top_ks, **{key: [s[key] for s in summaries] for key in summaries[0]}}


def match_at_top_ks(proposal_boxes: np.ndarray, gt_boxes: np.ndarray, top_ks) -> dict:
    """{k: (``greedy_match`` IoU [G], best IoU [G])} of the first k proposals (0: all). Only the
    proposals with IoU >= 0.5 to some GT box are matched: greedy matching takes those pairs
    before any lower one, so every recall at 0.5 and above is exact."""
    iou = box_iou(proposal_boxes, gt_boxes)  # [R, G]
    useful = iou.max(axis=1) >= 0.5 if len(iou) else np.zeros(0, bool)  # [R]
    out = {}
    for k in top_ks:
        head = iou[:k] if k > 0 else iou
        best = head.max(axis=0) if len(head) else np.zeros(len(gt_boxes))
        out[k] = (greedy_match(head[useful[:len(head)]]), best)
    return out


def recall_summary(matches: list[tuple[np.ndarray, np.ndarray]], classes: np.ndarray) -> dict[str, float]:
    """recall@0.5, recall@0.7, AR, ABO and MABO (``proposal_recall``) of per-image
    ``match_at_top_ks`` entries and the GT classes [G_total]; -1 for each when there is no GT box."""
    if not len(classes):
        return dict.fromkeys(("recall@0.5", "recall@0.7", "AR", "ABO", "MABO"), -1.0)
    matched, best = (np.concatenate(parts) for parts in zip(*matches))  # [G_total] each
    recalls = [float((matched >= t).mean()) for t in IOU_THRESHOLDS]
    return {"recall@0.5": recalls[0], "recall@0.7": recalls[4], "AR": float(np.mean(recalls)),
            "ABO": float(best.mean()), "MABO": float(np.mean([best[classes == c].mean() for c in np.unique(classes)]))}


def warn_if_low_recall(dataset, store, top_k: int, data_spec: dict | None = None) -> str | None:
    """Print (stderr) and return one line with the figure and the fix when recall@0.5 of the first
    ``top_k`` proposals (0: all) is below ``LOW_RECALL``, else None. ``data_spec``
    (``DatasetConfig`` as a dict) names the data in the suggested command."""
    records = [r for r in dataset.records if len(counted_gt(r)[0])]
    if not records:
        return None
    step = max(1, math.ceil(len(records) / WARNING_IMAGES))
    subset = type(dataset)(dataset.name, records[::step], dataset.class_names, dataset.category_ids)
    recall = proposal_recall(subset, store, top_ks=[top_k if top_k > 0 else 10 ** 9])["recall@0.5"][0]
    if recall >= LOW_RECALL:
        return None
    data = data_arguments(data_spec or {"path": "TRAIN", "format": "coco"})
    message = (f"warning: proposal recall@0.5 is {recall:.2f} at {f'top_k {top_k}' if top_k > 0 else 'all proposals'}"
               f" ({len(subset)} images): no detector can find more of the objects than that. Run `detect "
               f"tune-proposals --data {data} --out proposals.yaml` to choose proposal settings for this data")
    print(message, file=sys.stderr)
    return message


def data_arguments(data_spec: dict) -> str:
    """The ``--data`` value (and VOC flags) of a command line for ``data_spec``."""
    voc = f" --format voc --split {data_spec.get('split', '')}" if data_spec["format"] == "voc" else ""
    return data_spec["path"] + voc


def best_proposals(proposal_boxes: np.ndarray, gt_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each GT box, the proposal of highest IoU (ABO's best overlap, no one-to-one
    matching): its index [G] (-1 when there is no proposal) and that IoU [G]."""
    iou = box_iou(proposal_boxes, gt_boxes)  # [R, G]
    if iou.shape[0] == 0:
        return np.full(iou.shape[1], -1, np.int64), np.zeros(iou.shape[1])
    return iou.argmax(axis=0), iou.max(axis=0)


def first_covering(proposal_boxes: np.ndarray, gt_boxes: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """For each GT box [G], the rank of the first proposal (selective search's order) with IoU
    >= ``iou``, or -1: the top k proposals cover a box when 0 <= rank < k."""
    covered = box_iou(proposal_boxes, gt_boxes) >= iou  # [R, G]
    return np.where(covered.any(axis=0), covered.argmax(axis=0), -1)


def counted_gt(record) -> tuple[np.ndarray, np.ndarray]:
    """The GT boxes [G, 4] xyxy and classes [G] that recall counts: all but difficult / crowd."""
    gt_boxes = np.asarray(record.gt_boxes, dtype=np.float32).reshape(-1, 4)
    gt_classes = np.asarray(record.gt_classes, dtype=np.int64).reshape(-1)
    difficult = gt_flags(record.gt_difficult, len(gt_boxes))
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
    rows = [f"{'top-k':>6}  " + "  ".join(f"{k:>13}" for k in keys)]
    for i, k in enumerate(recall["top_k"]):
        cells = [f"{recall[key][i]:13.1f}" if key == "avg_proposals" else f"{recall[key][i]:13.4f}" for key in keys]
        rows.append(f"{k:>6}  " + "  ".join(cells))
    return "\n".join(rows)
