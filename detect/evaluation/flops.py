"""FLOPs per image and stage: machine-independent and deterministic, beside measured times.

Counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add) on **meta**
tensors, where only shapes flow; per-RoI work (R-CNN's CNN on one warp, Fast R-CNN's head on one
pooled RoI) is counted once and multiplied by the number of proposals. Added by formula, unseen
by the counter: RoI pooling, ``R * C * S * S * k`` with k = 1 comparison per output for max
pooling (a lower bound) or 32 for RoI align (2 x 2 samples of 4 bilinear taps), either under
0.1% of VGG16's fc6; R-CNN's warp, 4 bilinear taps per output value (8 FLOPs).
``detector_flops`` counts a detector at its settings, ``paper_flops`` both at the papers'.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from detect.models.backbones import build_backbone
from detect.models.detector import Detector
from detect.models.fast_rcnn import FastRCNN, resize_scale
from detect.models.rcnn import RCNN, RegionNet

ROI_FLOPS_PER_OUTPUT = {"roi_pool": 1, "roi_align": 32}  # see the module docstring
WARP_FLOPS_PER_OUTPUT = 8  # bilinear: 4 taps x (multiply + add)
PAPER_NUM_PROPOSALS = 2000
PAPER_FAST_RCNN_INPUT = (600, 1000)  # [FRCN] shorter side 600, longer side capped at 1000
PAPER_RCNN_CROP = 224  # VGG16's input, which our configs use; [RCNN]'s 227 is AlexNet's
PAPER_NUM_CLASSES = 20  # PASCAL VOC
PAPER_SETTINGS = (f"VGG16 without weights, {PAPER_NUM_PROPOSALS} proposals, {PAPER_NUM_CLASSES} classes; Fast R-CNN "
                  f"on a {PAPER_FAST_RCNN_INPUT[0]} x {PAPER_FAST_RCNN_INPUT[1]} input, R-CNN on {PAPER_RCNN_CROP} x "
                  f"{PAPER_RCNN_CROP} warps (VGG16's input; the R-CNN paper's 227 is AlexNet's)")


def count_flops(module: nn.Module, *inputs_shapes: tuple[int, ...]) -> int:
    """FLOPs of one ``module(*inputs)`` call with inputs of these shapes, counted on meta
    tensors (``module`` is copied to the meta device unless it already lives there)."""
    if next(module.parameters(), torch.empty(0, device="meta")).device.type != "meta":
        module = copy.deepcopy(module).to("meta")
    inputs = [torch.empty(shape, device="meta") for shape in inputs_shapes]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


class _RoIHead(nn.Module):
    """Fast R-CNN's per-RoI work after pooling: head, then the two sibling layers."""

    def __init__(self, head: nn.Module, cls_score: nn.Module, bbox_pred: nn.Module):
        super().__init__()
        self.head, self.cls_score, self.bbox_pred = head, cls_score, bbox_pred

    def forward(self, pooled):
        x = self.head(pooled)
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_flops(*, body: nn.Module, roi_head: nn.Module, out_channels: int, roi_size: int,
                    input_hw: tuple[int, int], num_proposals: int,
                    roi_op: str = "roi_pool") -> dict[str, int]:
    """{"backbone", "roi_head"} FLOPs of Fast R-CNN on a network input of ``input_hw``."""
    c, s = out_channels, roi_size
    per_roi = count_flops(roi_head, (1, c, s, s))
    pooling = num_proposals * c * s * s * ROI_FLOPS_PER_OUTPUT[roi_op]
    return {"backbone": count_flops(body, (1, 3, *input_hw)), "roi_head": num_proposals * per_roi + pooling}


def rcnn_flops(*, net: nn.Module, crop_size: int, num_proposals: int, head_dim: int, pool5_dim: int,
               num_classes: int) -> dict[str, int]:
    """{"warp", "features", "svm", "bbox_reg"} FLOPs of R-CNN on ``num_proposals`` warps."""
    r, k = num_proposals, num_classes
    return {"warp": r * 3 * crop_size * crop_size * WARP_FLOPS_PER_OUTPUT,
            "features": r * count_flops(net, (1, 3, crop_size, crop_size)),
            "svm": r * 2 * head_dim * k,
            "bbox_reg": r * 2 * pool5_dim * 4 * k}


def detector_flops(detector: Detector, image_hw: tuple[int, int], num_proposals: int) -> dict[str, int]:
    """FLOPs per stage of ``detector`` at its settings on one image of ``image_hw`` (original
    pixels) with ``num_proposals`` proposals (cut to its ``proposal_top_k`` when set)."""
    r = min(num_proposals, detector.proposal_top_k) if detector.proposal_top_k > 0 else num_proposals
    if isinstance(detector, FastRCNN):  # multi-scale test: the backbone runs at every scale
        h, w = image_hw
        body = copy.deepcopy(detector.body).to("meta")
        roi_head = _RoIHead(detector.head, detector.cls_score, detector.bbox_pred)
        total: dict[str, int] = {}
        for i, size in enumerate(detector.test_scales):
            scale = resize_scale(h, w, size, detector.test_max_size)
            input_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
            with torch.no_grad():
                out_channels = int(body(torch.empty((1, 3, *input_hw), device="meta")).shape[1])
            stages = fast_rcnn_flops(body=body, roi_head=roi_head, out_channels=out_channels,
                                     roi_size=detector.roi_size, input_hw=input_hw,
                                     num_proposals=r if i == 0 else 0, roi_op=detector.roi_op)
            total = {k: total.get(k, 0) + v for k, v in stages.items()}  # each RoI on one scale only
        return total
    if isinstance(detector, RCNN):
        return rcnn_flops(net=detector.net, crop_size=detector.crop_size, num_proposals=r,
                          head_dim=detector.svm_weight.shape[1], pool5_dim=detector.bbox_weight.shape[1],
                          num_classes=detector.num_classes)
    raise ValueError(f"FLOP count: unknown detector kind {detector.kind!r}")


@functools.lru_cache(maxsize=1)  # deterministic; building VGG16 on meta takes seconds
def paper_flops() -> dict:
    """Both detectors at ``PAPER_SETTINGS`` (VGG16 built on meta): {"settings", "fast_rcnn":
    {stage: FLOPs}, "rcnn": {stage: FLOPs}, "rcnn_over_fast_rcnn"}. Cached: copy it to change it."""
    with torch.device("meta"):
        bb = build_backbone("vgg16", weights="none", head_dim=4096, roi_size=7)
        k = PAPER_NUM_CLASSES
        roi_head = _RoIHead(bb.head, nn.Linear(bb.head_dim, k + 1), nn.Linear(bb.head_dim, 4 * k))
        net = RegionNet(body=bb.body, head=bb.head, roi_size=bb.roi_size)
    fast = fast_rcnn_flops(body=bb.body, roi_head=roi_head, out_channels=bb.out_channels, roi_size=bb.roi_size,
                           input_hw=PAPER_FAST_RCNN_INPUT, num_proposals=PAPER_NUM_PROPOSALS)
    slow = rcnn_flops(net=net, crop_size=PAPER_RCNN_CROP, num_proposals=PAPER_NUM_PROPOSALS, head_dim=bb.head_dim,
                      pool5_dim=bb.out_channels * bb.roi_size ** 2, num_classes=k)
    return {"settings": PAPER_SETTINGS, "fast_rcnn": fast, "rcnn": slow,
            "rcnn_over_fast_rcnn": sum(slow.values()) / sum(fast.values())}
