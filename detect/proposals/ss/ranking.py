"""Pseudo-random ranking of the boxes of several hierarchies [SS, section 3.4].

As ``Image2HierarchicalGrouping.m``: within one hierarchy of n initial regions the LAST merge
has position 1, ..., the first merge n - 1, the initial regions n (listed once per
segmentation, with the first strategy's hierarchy); a single region: its box at position 1.

value = position * U[0, 1), drawn from ``np.random.default_rng([seed, hierarchy_index])`` in
list order (independent of threads or processes). All hierarchies are pooled, sorted by value
(stable), duplicates removed keeping the first. ``near_duplicates_last``: ``ranking: nms``.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def hierarchy_positions(n_initial: int, n_boxes: int, include_initial: bool) -> tuple[np.ndarray, np.ndarray]:
    """Which of a hierarchy's n_boxes regions (creation order: n_initial initial ones, then the
    merges) are listed, and their positions: (indices int64 [L], positions float64 [L])."""
    merged = np.arange(n_initial, n_boxes, dtype=np.int64)
    merged_pos = np.arange(n_boxes - n_initial, 0, -1, dtype=np.float64)  # last merge -> 1
    if not include_initial:
        return merged, merged_pos
    # The initial regions, then the merges (a single region: its box, position n_initial = 1).
    return np.arange(n_boxes, dtype=np.int64), np.concatenate([np.full(n_initial, float(n_initial)), merged_pos])


def rank_boxes(hierarchies: list[tuple[np.ndarray, int, bool]], seed: int = 0,
               randomize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pool and rank hierarchies, each (boxes int32 [T, 4] inclusive in creation order, n_initial,
    include_initial), in index order; randomize=False: values = positions. Returns (boxes int32
    [R, 4] inclusive, values float64 [R]), best first, no duplicates."""
    all_boxes, all_values = [], []
    for index, (boxes, n_initial, include_initial) in enumerate(hierarchies):
        rows, positions = hierarchy_positions(int(n_initial), boxes.shape[0], include_initial)
        factors = np.random.default_rng([int(seed), index]).random(rows.size) if randomize else np.ones(rows.size)
        all_boxes.append(boxes[rows])
        all_values.append(positions * factors)
    if not all_boxes:
        return np.zeros((0, 4), np.int32), np.zeros(0)
    values = np.concatenate(all_values)
    order = np.argsort(values, kind="stable")
    boxes = np.concatenate(all_boxes).astype(np.int64)[order]
    values = values[order]
    span = int(boxes.max()) + 2 if boxes.size else 1  # coordinates are in 0..span-2
    if span ** 4 < 2 ** 63:  # one int64 key per box
        keys = ((boxes[:, 0] * span + boxes[:, 1]) * span + boxes[:, 2]) * span + boxes[:, 3]
        _, first = np.unique(keys, return_index=True)
    else:  # giant images: row-wise unique
        _, first = np.unique(boxes, axis=0, return_index=True)
    first = np.sort(first)
    return boxes[first].astype(np.int32), values[first]


@njit(cache=True, nogil=True)
def _nms_survivors(boxes: np.ndarray, iou: float) -> np.ndarray:
    """bool [R]: box r survives greedy NMS in list order (IoU > ``iou`` with an earlier survivor
    suppresses it). boxes float64 [R, 4] xyxy."""
    n = boxes.shape[0]
    alive = np.zeros(n, np.bool_)
    kept = np.empty(n, np.int64)
    n_kept = 0
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for r in range(n):
        survive = True
        for q in range(n_kept):
            k = kept[q]
            inter_w = min(boxes[r, 2], boxes[k, 2]) - max(boxes[r, 0], boxes[k, 0])
            if inter_w <= 0.0:
                continue
            inter_h = min(boxes[r, 3], boxes[k, 3]) - max(boxes[r, 1], boxes[k, 1])
            if inter_h <= 0.0:
                continue
            inter = inter_w * inter_h
            if inter > iou * (area[r] + area[k] - inter):
                survive = False
                break
        if survive:
            alive[r] = True
            kept[n_kept] = r
            n_kept += 1
    return alive


def near_duplicates_last(boxes: np.ndarray, values: np.ndarray, iou: float) -> tuple[np.ndarray, np.ndarray]:
    """The "nms" ranking of boxes [R, 4] xyxy with ascending ``values`` [R]: the survivors of
    greedy NMS at ``iou`` first, then the suppressed, each in the given order (none dropped).
    Returns (order int64 [R], values float64 [R]: a suppressed box's + 1 + the largest)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    alive = _nms_survivors(np.ascontiguousarray(boxes, dtype=np.float64), float(iou))
    order = np.concatenate([np.flatnonzero(alive), np.flatnonzero(~alive)])
    values = np.asarray(values, dtype=np.float64)
    shifted = np.where(alive, values, values + 1.0 + values.max())
    return order, shifted[order]
