"""Per-detection matches, AP from them, and bootstrap intervals over images.

pycocotools re-accumulates every image for every AP, and a bootstrap needs thousands of APs, so
the matching is done once here as COCOeval.evaluateImg does it (per image and class: the top
``MAX_DETS`` detections by score, each to the unmatched gt box of highest IoU >= t, non-ignored
first; a detection matched to an ignored box is ignored). AP is COCO's 101-point interpolated
precision averaged over the classes with gt; a bootstrap sample weights each image by its draws
(the same curve as repeating it). ``tests/test_matching.py`` checks the AP against pycocotools.

Shapes: G ground-truth boxes, D detections of one image; T IoU thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detect.common.box_ops import box_iou

RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's recThrs
MAX_DETS = 100  # detections per image and class, COCO's maxDets


@dataclass
class ImageBoxes:
    """One image's ground truth and detections (xyxy pixels, classes 1..K)."""

    gt_boxes: np.ndarray  # [G, 4]
    gt_classes: np.ndarray  # [G]
    gt_ignore: np.ndarray  # [G] bool: VOC difficult / COCO crowd
    boxes: np.ndarray  # [D, 4]
    scores: np.ndarray  # [D]
    labels: np.ndarray  # [D]


def match_detections(ious: np.ndarray, gt_ignore: np.ndarray, iou_threshold: float) -> np.ndarray:
    """The matching of the module docstring in one image and class: ``ious`` [D, G] of the
    detections in score order and the ground truth with the non-ignored first (``gt_ignore``
    [G]) -> the matched box of each detection [D] (-1: none)."""
    matched = np.full(ious.shape[0], -1, np.int64)
    used = np.zeros(ious.shape[1], bool)
    for j in range(ious.shape[0]):
        best, m = min(iou_threshold, 1 - 1e-10), -1
        for g in range(ious.shape[1]):
            if used[g]:
                continue
            if m > -1 and not gt_ignore[m] and gt_ignore[g]:
                break
            if ious[j, g] < best:
                continue
            best, m = ious[j, g], g
        if m > -1:
            used[m] = True
            matched[j] = m
    return matched


def class_order(im: ImageBoxes, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k's indices in ``im`` as COCO orders them: its top ``MAX_DETS`` detections by score
    [D] and its gt boxes, the non-ignored first [G]."""
    d = np.flatnonzero(im.labels == k)
    g = np.flatnonzero(im.gt_classes == k)
    ignored = np.asarray(im.gt_ignore, bool)[g]
    return d[np.argsort(-im.scores[d], kind="mergesort")][:MAX_DETS], np.concatenate([g[~ignored], g[ignored]])


@dataclass
class MatchTable:
    """Every kept detection of a dataset with its match flags; per (image, class) gt counts."""

    image_index: np.ndarray  # [N] index into the image list
    labels: np.ndarray  # [N]
    scores: np.ndarray  # [N]
    flags: np.ndarray  # [N, T] 1 TP, 0 FP, -1 ignored
    num_gt: np.ndarray  # [num_images, K] non-ignored ground truth per image and class
    iou_thresholds: tuple[float, ...]


def match_images(images: list[ImageBoxes], num_classes: int, iou_thresholds=(0.5, 0.75)) -> MatchTable:
    """Match every image's detections to its ground truth at each IoU threshold (COCO's rules)."""
    idx, labels, scores = [], [], []  # per kept detection
    flags = [np.zeros((0, len(iou_thresholds)), np.int8)]  # [D, T] per image and class
    num_gt = np.zeros((len(images), num_classes), np.int64)
    for i, im in enumerate(images):
        for k in range(1, num_classes + 1):
            d, g = class_order(im, k)
            ign = np.asarray(im.gt_ignore, bool)[g]
            num_gt[i, k - 1] = int((~ign).sum())
            if d.size == 0:
                continue
            ious = box_iou(im.boxes[d], im.gt_boxes[g])  # [D, G]
            f = np.zeros((d.size, len(iou_thresholds)), np.int8)  # [D, T]
            for t, thr in enumerate(iou_thresholds):
                m = match_detections(ious, ign, thr)
                f[m > -1, t] = np.where(ign[m[m > -1]], -1, 1)
            idx += [i] * d.size
            labels += [k] * d.size
            scores += im.scores[d].tolist()
            flags.append(f)
    return MatchTable(np.array(idx, np.int64), np.array(labels, np.int64), np.array(scores, np.float64),
                      np.concatenate(flags), num_gt, tuple(iou_thresholds))


def ap_from_flags(flags: np.ndarray, weights: np.ndarray, num_pos: float) -> float:
    """COCO's 101-point AP of detections in score order with ``flags`` (1/0) and weights."""
    tp = np.cumsum(weights * (flags == 1))
    fp = np.cumsum(weights * (flags == 0))
    if tp.size == 0:
        return 0.0
    rc = tp / num_pos
    pr = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    pr = np.maximum.accumulate(pr[::-1])[::-1]
    inds = np.searchsorted(rc, RECALL_POINTS, side="left")
    q = np.where(inds < pr.size, pr[np.minimum(inds, pr.size - 1)], 0.0)
    return float(q.mean())


def average_precision(table: MatchTable, image_weights: np.ndarray | None = None) -> dict[float, float]:
    """{IoU threshold: AP} averaged over classes with ground truth; ``image_weights`` [images]
    counts each image that many times (a bootstrap sample). -1 when no class has ground truth."""
    w_img = np.ones(table.num_gt.shape[0]) if image_weights is None else np.asarray(image_weights, float)
    num_pos = w_img @ table.num_gt  # [K]
    w_det = w_img[table.image_index]  # [N]
    out = {}
    for t, thr in enumerate(table.iou_thresholds):
        aps = []
        for k in range(1, table.num_gt.shape[1] + 1):
            if num_pos[k - 1] <= 0:
                continue
            sel = np.flatnonzero((table.labels == k) & (table.flags[:, t] != -1) & (w_det > 0))
            sel = sel[np.argsort(-table.scores[sel], kind="mergesort")]
            aps.append(ap_from_flags(table.flags[sel, t], w_det[sel], num_pos[k - 1]))
        out[thr] = float(np.mean(aps)) if aps else -1.0
    return out


def bootstrap_ap(tables: list[MatchTable], *, num_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Paired bootstrap over images (all tables cover the same images, in order) of each table's AP
    and its AP minus the first's: ``{"ap": [{thr: {"value", "lo", "hi"}}], "diff_to_first": [{thr:
    {...}} or None], "drop": [{...}], "drop_diff_to_first": [{...} or None]}``, where "drop" is AP at
    the first threshold minus AP at the last (AP50 - AP75)."""
    n = tables[0].num_gt.shape[0]
    if any(t.num_gt.shape[0] != n for t in tables):
        raise ValueError("bootstrap_ap: the detectors were evaluated on different images")
    thresholds = tables[0].iou_thresholds
    point = np.array([list(average_precision(t).values()) for t in tables])  # [N, T]
    samples = np.empty((len(tables), num_resamples, len(thresholds)))  # [N, R, T]
    rng = np.random.default_rng(seed)
    for r in range(num_resamples):
        weights = np.bincount(rng.integers(0, n, n), minlength=n)
        for i, t in enumerate(tables):
            samples[i, r] = list(average_precision(t, weights).values())
    samples[samples < 0] = np.nan  # a resample without ground truth has no AP
    a = (1 - level) / 2 * 100

    def interval(values: np.ndarray, value: float) -> dict:
        values = values[np.isfinite(values)]
        lo, hi = np.percentile(values, [a, 100 - a]) if values.size else (np.nan, np.nan)
        return {"value": float(value), "lo": float(lo), "hi": float(hi)}

    ap = [{thr: interval(samples[i, :, t], point[i, t]) for t, thr in enumerate(thresholds)}
          for i in range(len(tables))]
    diffs = [None] + [{thr: interval(samples[i, :, t] - samples[0, :, t], point[i, t] - point[0, t])
                       for t, thr in enumerate(thresholds)} for i in range(1, len(tables))]
    drop, drop_point = samples[..., 0] - samples[..., -1], point[:, 0] - point[:, -1]  # [N, R], [N]
    drops = [interval(drop[i], drop_point[i]) for i in range(len(tables))]
    drop_diffs = [None] + [interval(drop[i] - drop[0], drop_point[i] - drop_point[0]) for i in range(1, len(tables))]
    return {"ap": ap, "diff_to_first": diffs, "drop": drops, "drop_diff_to_first": drop_diffs,
            "num_resamples": num_resamples, "seed": seed, "level": level}
