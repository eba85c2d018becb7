"""Box operations on torch tensors: box deltas and clipping (numpy box ops: ``detect.common.box_ops``).

Box deltas follow [RCNN] appendix C / [FRCN]: for a proposal P (center Px, Py, size Pw, Ph) and
its target G, ``tx = (Gx - Px) / Pw``, ``ty = (Gy - Py) / Ph``, ``tw = log(Gw / Pw)``,
``th = log(Gh / Ph)``, widths ``x2 - x1``. ``weights = 1 / std`` gives normalised targets
(the std: ``detect.common.config.TrainConfig.bbox_std``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Widest log-scale a delta may take before exp(): stops exp overflow on wild predictions
# (torchvision's BoxCoder uses the same bound).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """xyxy [R, 4] -> centre x, centre y, width, height, each [R]."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode_boxes(proposal_boxes: Tensor, gt_boxes: Tensor,
                 weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Regression targets that take ``proposal_boxes`` [R, 4] to ``gt_boxes`` [R, 4] -> [R, 4]."""
    px, py, pw, ph = _centre_size(proposal_boxes)
    gx, gy, gw, gh = _centre_size(gt_boxes)
    wx, wy, ww, wh = weights
    return torch.stack([wx * (gx - px) / pw, wy * (gy - py) / ph,
                        ww * torch.log(gw / pw), wh * torch.log(gh / ph)], dim=1)  # [R, 4]


def decode_boxes(deltas: Tensor, proposal_boxes: Tensor,
                 weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Apply ``deltas`` [R, ..., 4] (e.g. [R, K, 4]) to ``proposal_boxes`` [R, 4] -> xyxy [R, ..., 4]."""
    shape = (proposal_boxes.shape[0],) + (1,) * (deltas.dim() - 2)  # broadcast over the middle dims
    px, py, pw, ph = (v.reshape(shape) for v in _centre_size(proposal_boxes.to(deltas.dtype)))
    wx, wy, ww, wh = weights
    cx = deltas[..., 0] / wx * pw + px
    cy = deltas[..., 1] / wy * ph + py
    w = torch.exp((deltas[..., 2] / ww).clamp(max=BBOX_XFORM_CLIP)) * pw
    h = torch.exp((deltas[..., 3] / wh).clamp(max=BBOX_XFORM_CLIP)) * ph
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """Clip xyxy boxes [..., 4] to the image [0, width] x [0, height]."""
    return boxes.clamp(min=0).minimum(boxes.new_tensor([width, height, width, height]))
