"""Box operations on numpy arrays, without torch (so numpy-only code starts fast): IoU,
(x, y, w, h) conversions, flips. Widths are ``x2 - x1``, without the MATLAB-era ``+ 1``.
"""

from __future__ import annotations

import numpy as np


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU matrix [A, B] of xyxy boxes [A, 4] and [B, 4], in float64 (0 where the union is empty)."""
    a = np.asarray(boxes1, np.float64).reshape(-1, 4)[:, None, :]  # [A, 1, 4]
    b = np.asarray(boxes2, np.float64).reshape(-1, 4)[None, :, :]  # [1, B, 4]
    inter_w = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(0)
    inter_h = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(0)
    inter = inter_w * inter_h  # [A, B]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])  # [A, 1]
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # [1, B]
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _float_array(boxes) -> np.ndarray:
    """[R, 4] float64 when given float64 (coordinates written to JSON), float32 otherwise."""
    boxes = np.asarray(boxes)
    return boxes.astype(np.float64 if boxes.dtype == np.float64 else np.float32).reshape(-1, 4)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """COCO / OpenCV (x, y, w, h) [R, 4] -> xyxy [R, 4]."""
    boxes = _float_array(boxes)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """xyxy [R, 4] -> COCO (x, y, w, h) [R, 4]."""
    boxes = _float_array(boxes)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror xyxy boxes [R, 4] horizontally in an image of ``width`` pixels."""
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
