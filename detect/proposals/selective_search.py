"""Selective search on one image ([SS] Uijlings et al., IJCV 2013), boxes in original pixels.

The settings (defaults: as [RCNN] used it) are the fields of
``detect.common.config.ProposalConfig``; the modes are the table in ``detect.proposals.ss.engine``.
Two engines, with the paper's settings in every mode: ``"ours"`` (``detect.proposals.ss``,
deterministic for a given ``seed`` at any number of threads or processes) and ``"opencv"``
(``cv2.ximgproc``'s parts assembled as the paper's modes; OpenCV's own
``switchToSelectiveSearchFast`` is not the paper's fast mode). OpenCV ranks with libc's
process-wide ``rand()``: we seed it (``srand(1)``) before each run, under a lock, so the order
depends only on the image (not on Windows).
"""

from __future__ import annotations

import ctypes
import threading

import cv2
import numpy as np

from detect.common.box_ops import xywh_to_xyxy
from detect.common.config import check_proposal_settings
from detect.proposals.ss.engine import MODES, check_image, selective_search_boxes
from detect.proposals.ss.features import colour_space
from detect.proposals.ss.ranking import near_duplicates_last
from detect.proposals.ss.segmentation import SIGMA

MAX_ELONGATION = 4  # see resized_shape


def selective_search(image: np.ndarray, *, engine: str = "ours", mode: str = "fast", resize: int = 500,
                     resize_side: str = "width", min_size: int = 20, seed: int = 0,
                     ranking: str = "paper", nms_iou: float = 0.7, k_scale: float = 1.0,
                     threads: int = 1, return_scores: bool = False):
    """Selective-search boxes of uint8 RGB ``image`` [H, W, 3]: float32 [R, 4] xyxy in its pixels
    (R may be 0), in the ranking's order; with ``return_scores`` also the ranking values float32
    [R], ascending. ``threads``: our engine runs this image's hierarchies in parallel, same output."""
    raw = raw_proposals(image, engine=engine, mode=mode, resize=resize, resize_side=resize_side, seed=seed,
                        k_scale=k_scale, threads=threads)
    boxes, scores = finish_proposals(raw, min_size=min_size, ranking=ranking, nms_iou=nms_iou)
    return (boxes, scores) if return_scores else boxes


def first_proposals(boxes, top_k: int):
    """The one cut of ``proposals.top_k``: the first ``top_k`` proposals [R, 4] (0 = all)."""
    return boxes[:top_k] if top_k > 0 else boxes


def raw_proposals(image: np.ndarray, *, engine: str = "ours", mode: str = "fast", resize: int = 500,
                  resize_side: str = "width", seed: int = 0, k_scale: float = 1.0,
                  threads: int = 1) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """The expensive half of ``selective_search``: resize (``resized_shape``), run ``engine``,
    drop exact duplicates. -> (boxes float32 [R, 4] xyxy in resized pixels, ranking values
    float32 [R], (original height, width, resized height, width))."""
    check_proposal_settings({"engine": engine, "mode": mode, "resize": resize, "resize_side": resize_side,
                             "seed": seed, "k_scale": k_scale}, "selective_search")
    check_image(image)
    height, width = image.shape[:2]
    small_height, small_width = resized_shape(height, width, resize, resize_side)
    small = image  # [h, w, 3] RGB, small images enlarged too, as [RCNN] did
    if (small_height, small_width) != (height, width):  # INTER_AREA averages when shrinking, as imresize
        interpolation = cv2.INTER_AREA if small_width * small_height < width * height else cv2.INTER_LINEAR
        small = cv2.resize(image, (small_width, small_height), interpolation=interpolation)
    if engine == "ours":
        boxes, scores = selective_search_boxes(small, mode=mode, seed=seed, threads=threads,
                                               k_scale=k_scale)  # [R, 4], [R]
    else:
        boxes = opencv_selective_search(small, mode, k_scale=k_scale)
        scores = np.arange(len(boxes), dtype=np.float32)
    _, first = np.unique(boxes, axis=0, return_index=True)
    keep = np.sort(first)  # duplicates dropped, ranking kept
    return boxes[keep], scores[keep], (height, width, *small.shape[:2])


def finish_proposals(raw: tuple, *, min_size: int = 20, ranking: str = "paper",
                     nms_iou: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """``raw_proposals``' output -> (boxes float32 [R, 4] xyxy in original pixels, values [R]):
    drop boxes with a side under ``min_size`` resized pixels; ``ranking`` "nms" puts the boxes
    greedy NMS at ``nms_iou`` would suppress last (``ss.ranking.near_duplicates_last``)."""
    check_proposal_settings({"min_size": min_size, "ranking": ranking, "nms_iou": nms_iou}, "selective_search")
    boxes, scores, (height, width, small_height, small_width) = raw
    boxes = boxes.astype(np.float64)
    big_enough = (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)
    boxes, scores = boxes[big_enough], scores[big_enough]  # [R, 4] in the resized image, as FilterBoxesWidth
    if ranking == "nms":
        order, scores = near_duplicates_last(boxes, scores, nms_iou)
        boxes = boxes[order]
    boxes[:, 0::2] = (boxes[:, 0::2] * (width / small_width)).clip(0, width)
    boxes[:, 1::2] = (boxes[:, 1::2] * (height / small_height)).clip(0, height)
    return boxes.astype(np.float32), np.asarray(scores, dtype=np.float32)  # [R, 4] xyxy original pixels


def resized_shape(height: int, width: int, resize: int, resize_side: str) -> tuple[int, int]:
    """(height, width) after the proposal resize: ``resize_side`` becomes ``resize`` pixels (0:
    unchanged), aspect kept, the longer side capped at ``MAX_ELONGATION`` x ``resize`` (a 2 x
    700 px sliver is not blown up to 500 x 175000)."""
    side = {"width": width, "longer": max(height, width), "shorter": min(height, width)}[resize_side]
    if resize == 0 or side == resize:
        return height, width
    scale = min(resize / side, MAX_ELONGATION * resize / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


RANK_SEED = 1  # OpenCV's engine: srand(RANK_SEED) before each run

try:
    _srand = ctypes.CDLL(None).srand
except (OSError, AttributeError, TypeError):  # no C library reachable this way (Windows)
    _srand = None
_rand_lock = threading.Lock()


def _strategy(name: str):
    seg = cv2.ximgproc.segmentation
    parts = {"C": seg.createSelectiveSearchSegmentationStrategyColor,
             "T": seg.createSelectiveSearchSegmentationStrategyTexture,
             "S": seg.createSelectiveSearchSegmentationStrategySize,
             "F": seg.createSelectiveSearchSegmentationStrategyFill}
    strategies = [parts[letter]() for letter in name]  # fresh objects: they hold state
    return strategies[0] if len(strategies) == 1 else seg.createSelectiveSearchSegmentationStrategyMultiple(*strategies)


def opencv_selective_search(image: np.ndarray, mode: str = "fast", k_scale: float = 1.0) -> np.ndarray:
    """OpenCV selective search in the paper's ``MODES`` (k times ``k_scale``) on uint8 RGB [H, W, 3]:
    float32 xyxy [R, 4] (x2, y2 exclusive), in OpenCV's ranking."""
    colour_spaces, ks, strategies = MODES[mode]
    seg = cv2.ximgproc.segmentation
    image = np.ascontiguousarray(image)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    conversions = {"hsv": cv2.COLOR_BGR2HSV, "lab": cv2.COLOR_BGR2Lab}  # else the paper's rgI, H x 3, I x 3
    for name in colour_spaces:
        ss.addImage(cv2.cvtColor(bgr, conversions[name]) if name in conversions else colour_space(image, name)[0])
    for k in ks:
        k = k * k_scale  # min size = k, rounded as our engine
        ss.addGraphSegmentation(seg.createGraphSegmentation(SIGMA, float(k), max(1, int(k + 0.5))))
    for name in strategies:
        ss.addStrategy(_strategy(name))
    with _rand_lock:
        if _srand is not None:
            _srand(RANK_SEED)
        rects = np.asarray(ss.process(), dtype=np.int64).reshape(-1, 4)  # (x, y, w, h)
    return xywh_to_xyxy(rects.astype(np.float32))
