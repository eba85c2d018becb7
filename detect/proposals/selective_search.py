"""Selective search on one image ([SS] Uijlings et al., IJCV 2013), boxes in original pixels.

By default as [RCNN] used it: resized to 500 px wide, the paper's "fast" mode, boxes with a
side under 20 px of the RESIZED image dropped (``selective_search_boxes.m`` calls
``FilterBoxesWidth`` on the 500 px image). The settings are the fields of
``detect.common.config.ProposalConfig``, checked by its one rule (``check_proposal_settings``);
the modes are the table in ``detect.proposals.ss.engine``.

Two engines, with the paper's settings in every mode:
- ``"ours"`` (default): ``detect.proposals.ss``, our numba implementation of the paper's
  algorithm; deterministic for a given ``seed`` at any number of threads or processes.
- ``"opencv"``: OpenCV's ``cv2.ximgproc`` machinery assembled from its parts with the paper's
  settings (``addImage`` / ``addGraphSegmentation`` / ``addStrategy``). OpenCV's own
  ``switchToSelectiveSearchFast`` is NOT the paper's fast mode (k = 150, 300, 450, min size 100,
  12 hierarchies) and ranks by ``rand() x level``, small fragments first; it is not used.
  OpenCV ranks regions with libc's process-wide ``rand()``: we seed it (``srand(1)``) right
  before each run, under a lock, so the order depends only on the image (not on Windows).
"""

from __future__ import annotations

import ctypes
import threading

import cv2
import numpy as np

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
    """Selective-search boxes of one image: float32 [R, 4] xyxy in pixels of ``image``.

    ``image`` is uint8 RGB [H, W, 3] (``detect.data.images.read_image``). ``raw_proposals``
    resizes it (``resized_shape``), runs ``engine`` in ``mode`` (its k values times ``k_scale``;
    ``threads``: this image's hierarchies in parallel, our engine, same output) and drops exact
    duplicates, keeping the first; ``finish_proposals`` drops boxes with a side under
    ``min_size`` pixels of the resized image, applies ``ranking`` ("nms": the boxes greedy NMS
    at ``nms_iou`` would suppress go last, ``ss.ranking.near_duplicates_last``) and scales the
    boxes back. Every box is kept: the detectors take the first ``top_k`` (``first_proposals``).
    A tiny image may give shape [0, 4]. With ``return_scores``, also the ranking values float32
    [R] (ascending; OpenCV's engine: the rank position).
    """
    raw = raw_proposals(image, engine=engine, mode=mode, resize=resize, resize_side=resize_side, seed=seed,
                        k_scale=k_scale, threads=threads)
    boxes, scores = finish_proposals(raw, min_size=min_size, ranking=ranking, nms_iou=nms_iou)
    return (boxes, scores) if return_scores else boxes


def first_proposals(boxes, top_k: int):
    """The one cut of ``proposals.top_k``: the first ``top_k`` of an image's proposals [R, 4] in
    the ranking's order (0 = all). The detectors apply it where they read proposals, in
    training (``detect.commands.train_from_config``) and at test
    (``detect.models.detector.Detector.detect``)."""
    return boxes[:top_k] if top_k > 0 else boxes


def raw_proposals(image: np.ndarray, *, engine: str = "ours", mode: str = "fast", resize: int = 500,
                  resize_side: str = "width", seed: int = 0, k_scale: float = 1.0,
                  threads: int = 1) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """The expensive half of ``selective_search`` (cached by ``detect tune-proposals``): (boxes
    float32 [R, 4] xyxy in pixels of the resized image, in the engine's ranking, no duplicates;
    ranking values float32 [R]; (original height, width, resized height, width))."""
    check_proposal_settings({"engine": engine, "mode": mode, "resize": resize, "resize_side": resize_side,
                             "seed": seed, "k_scale": k_scale}, "selective_search")
    check_image(image)
    small = _resize_for_proposals(image, resize, resize_side)  # [h, w, 3] RGB
    if engine == "ours":
        boxes, scores = selective_search_boxes(small, mode=mode, seed=seed, threads=threads,
                                               k_scale=k_scale)  # [R, 4], [R]
    else:
        boxes = opencv_selective_search(small, mode, k_scale=k_scale)
        scores = np.arange(len(boxes), dtype=np.float32)
    _, first = np.unique(boxes, axis=0, return_index=True)
    keep = np.sort(first)  # duplicates dropped, ranking kept
    return boxes[keep], scores[keep], (*image.shape[:2], *small.shape[:2])


def finish_proposals(raw: tuple, *, min_size: int = 20, ranking: str = "paper",
                     nms_iou: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """``raw_proposals``' output -> (boxes float32 [R, 4] xyxy in original pixels, ranking values
    float32 [R], ascending): the min-size filter and the ranking of ``selective_search``."""
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
    """(height, width) of an image after the proposal resize: ``resize_side`` ("width", "longer"
    or "shorter") becomes ``resize`` pixels ([RCNN]: width 500; 0: unchanged), aspect kept, the
    longer side capped at ``MAX_ELONGATION`` x ``resize`` (so that a sliver, say 2 x 700 px, is
    not blown up to 500 x 175000 px to make its width 500)."""
    side = {"width": width, "longer": max(height, width), "shorter": min(height, width)}[resize_side]
    if resize == 0 or side == resize:
        return height, width
    scale = min(resize / side, MAX_ELONGATION * resize / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize_for_proposals(image: np.ndarray, resize: int, resize_side: str) -> np.ndarray:
    """Resize to ``resized_shape``. Small images are enlarged too, as [RCNN] did (MATLAB
    ``imresize(im, [NaN 500])``)."""
    height, width = image.shape[:2]
    new_height, new_width = resized_shape(height, width, resize, resize_side)
    if (new_height, new_width) == (height, width):
        return image
    # INTER_AREA averages when shrinking (anti-aliased, like MATLAB's imresize in [RCNN]).
    interpolation = cv2.INTER_AREA if new_width * new_height < width * height else cv2.INTER_LINEAR
    return cv2.resize(image, (new_width, new_height), interpolation=interpolation)


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
    if len(strategies) == 1:
        return strategies[0]
    return seg.createSelectiveSearchSegmentationStrategyMultiple(*strategies)


def _opencv_image(image_rgb: np.ndarray, bgr: np.ndarray, name: str) -> np.ndarray:
    if name == "hsv":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    if name == "lab":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2Lab)
    return colour_space(image_rgb, name)[0]  # paper's rgI, H x 3, I x 3


def opencv_selective_search(image: np.ndarray, mode: str = "fast", k_scale: float = 1.0) -> np.ndarray:
    """OpenCV selective search with the paper's settings (``MODES``; k times ``k_scale``) on a
    uint8 RGB [H, W, 3] image: float32 [R, 4] xyxy boxes (x2, y2 exclusive), in OpenCV's ranking."""
    check_image(image)
    check_proposal_settings({"mode": mode, "k_scale": k_scale}, "opencv_selective_search")
    colour_spaces, ks, strategies = MODES[mode]
    seg = cv2.ximgproc.segmentation
    image = np.ascontiguousarray(image)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    ss.clearImages()
    ss.clearGraphSegmentations()
    ss.clearStrategies()
    for name in colour_spaces:
        ss.addImage(_opencv_image(image, bgr, name))
    for k in ks:
        k = k * k_scale  # min size = k, rounded as our engine
        ss.addGraphSegmentation(seg.createGraphSegmentation(SIGMA, float(k), max(1, int(k + 0.5))))
    for name in strategies:
        ss.addStrategy(_strategy(name))
    with _rand_lock:
        if _srand is not None:
            _srand(RANK_SEED)
        rects = np.asarray(ss.process(), dtype=np.int64).reshape(-1, 4)  # (x, y, w, h)
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1).astype(np.float32)  # xyxy
