"""Per-detection matches, AP from them, bootstrap intervals over images, and where AP50 goes.

pycocotools re-accumulates every image for every AP, and a bootstrap needs thousands of APs, so
the matching is done once here as COCOeval.evaluateImg does it (per image and class: the top
``MAX_DETS`` detections by score, each to the unmatched gt box of highest IoU >= t, non-ignored
first; a detection matched to an ignored box is ignored). AP is COCO's 101-point interpolated
precision averaged over the classes with gt; a bootstrap sample weights each image by its draws
(the same curve as repeating it). ``tests/test_matching.py`` checks the AP against pycocotools.

Shapes: G ground-truth boxes, D detections of one image; T IoU thresholds.

Where AP50 goes (``error_breakdown``): an error breakdown in the manner of TIDE (Bolya et al.,
ECCV 2020), not the ``tidecv`` package (it pulls in opencv-python, pandas and seaborn), but the
paper's definitions at foreground IoU t_f = 0.5 and background IoU t_b = 0.1: after COCO's
matching at t_f (``match_detections``), each false positive gets one type, in this order:

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

from dataclasses import dataclass

import numpy as np

from detect.common.box_ops import box_iou

RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's recThrs
MAX_DETS = 100  # detections per image and class, COCO's maxDets
ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
FG_IOU, BG_IOU = 0.5, 0.1  # t_f and t_b


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
