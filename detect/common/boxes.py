"""Box operations. One internal format: float xyxy in pixels of the original image.

Box deltas follow [RCNN] appendix C / [FRCN]: for a proposal P (center Px, Py, size Pw, Ph) and
its target G, ``tx = (Gx - Px) / Pw``, ``ty = (Gy - Py) / Ph``, ``tw = log(Gw / Pw)``,
``th = log(Gh / Ph)``. Widths are ``x2 - x1`` (continuous coordinates, as detectron2 and
torchvision; the MATLAB-era ``+ 1`` is dropped). ``weights`` divide the targets' scale, so
``weights = 1 / std`` gives normalised targets; our fixed std (0.1, 0.1, 0.2, 0.2) is
py-faster-rcnn's BBOX_NORMALIZE_STDS ([FRCN] itself used per-class training-set stds).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = [
    "box_iou",
    "encode_boxes",
    "decode_boxes",
    "clip_boxes",
    "flip_boxes",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
    "box_iou_numpy",
]

# Widest log-scale a delta may take before exp(): stops exp overflow on wild predictions
# (torchvision's BoxCoder uses the same bound).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def encode_boxes(proposal_boxes: Tensor, gt_boxes: Tensor,
                 weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Regression targets that take ``proposal_boxes`` [R, 4] to ``gt_boxes`` [R, 4] -> [R, 4]."""
    pw = proposal_boxes[:, 2] - proposal_boxes[:, 0]
    ph = proposal_boxes[:, 3] - proposal_boxes[:, 1]
    px = proposal_boxes[:, 0] + 0.5 * pw
    py = proposal_boxes[:, 1] + 0.5 * ph
    gw = gt_boxes[:, 2] - gt_boxes[:, 0]
    gh = gt_boxes[:, 3] - gt_boxes[:, 1]
    gx = gt_boxes[:, 0] + 0.5 * gw
    gy = gt_boxes[:, 1] + 0.5 * gh
    wx, wy, ww, wh = weights
    tx = wx * (gx - px) / pw
    ty = wy * (gy - py) / ph
    tw = ww * torch.log(gw / pw)
    th = wh * torch.log(gh / ph)
    return torch.stack([tx, ty, tw, th], dim=1)  # [R, 4]


def decode_boxes(deltas: Tensor, proposal_boxes: Tensor,
                 weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Apply ``deltas`` [R, ..., 4] to ``proposal_boxes`` [R, 4] -> boxes [R, ..., 4] (xyxy).

    ``deltas`` may carry extra middle dimensions (e.g. [R, K, 4], one delta per class).
    """
    proposal_boxes = proposal_boxes.to(deltas.dtype)
    extra = deltas.dim() - 2
    shape = (proposal_boxes.shape[0],) + (1,) * extra
    pw = (proposal_boxes[:, 2] - proposal_boxes[:, 0]).reshape(shape)
    ph = (proposal_boxes[:, 3] - proposal_boxes[:, 1]).reshape(shape)
    px = proposal_boxes[:, 0].reshape(shape) + 0.5 * pw
    py = proposal_boxes[:, 1].reshape(shape) + 0.5 * ph
    wx, wy, ww, wh = weights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=BBOX_XFORM_CLIP)
    dh = (deltas[..., 3] / wh).clamp(max=BBOX_XFORM_CLIP)
    cx = dx * pw + px
    cy = dy * ph + py
    w = torch.exp(dw) * pw
    h = torch.exp(dh) * ph
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """Clip xyxy boxes [..., 4] to the image [0, width] x [0, height]."""
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def flip_boxes(boxes: Tensor | np.ndarray, width: int) -> Tensor | np.ndarray:
    """Mirror xyxy boxes [R, 4] horizontally in an image of ``width`` pixels."""
    out = boxes.clone() if isinstance(boxes, Tensor) else boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


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


def box_iou_numpy(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU matrix [A, B] of xyxy boxes [A, 4] and [B, 4] (numpy, float32)."""
    if len(boxes1) == 0 or len(boxes2) == 0:
        return np.zeros((len(boxes1), len(boxes2)), dtype=np.float32)
    return box_iou(torch.as_tensor(boxes1, dtype=torch.float32),
                   torch.as_tensor(boxes2, dtype=torch.float32)).numpy()
