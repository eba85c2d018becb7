"""R-CNN ([RCNN] Girshick et al., CVPR 2014): warped regions -> CNN -> per-class SVMs + box ridge.

Shapes: R regions (proposals, and ground truth during training), B crops in a batch, K object
classes (background is not a column), C x S x S the pool5 map, D the fc7 width, D5 = C * S * S.

The network is the shared ``detect.models.backbones.Backbone`` on warped crops [B, 3, crop, crop]:
pool5 = ``body(crop)`` max-pooled to S x S, fc7 = ``head(pool5)``. Training: ``detect.training.rcnn_train``.

Region warping (``warp_regions``) follows [RCNN] rcnn_im_crop.m "warp" mode: the box is dilated
about its centre by crop / (crop - 2 * context_pad) and warped anisotropically; content outside
the image is the mean. The MATLAB code clipped the dilated box, resized the in-image part and
pasted it at a rounded offset; we sample the whole dilated box, without that rounding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from detect.common.runtime import autocast
from detect.models.backbones import Backbone, inference_copy, normalize_pixels
from detect.models.detector import Detector, ProposalScores, StageTimer


def warp_regions(image: Tensor, boxes: Tensor, *, crop_size: int, context_pad: int = 16,
                 fill: Tensor | None = None) -> Tensor:
    """Warp regions of one image to squares: image [3, H, W] float, boxes [R, 4] xyxy ->
    [R, 3, crop_size, crop_size], batched on the image's device (one ``roi_align`` call).

    Each output pixel is one bilinear sample (no anti-aliasing) of the dilated box. Whatever falls
    outside the image, the half-pixel border included, is exactly ``fill`` [3] (the image mean in
    its units; None = 0, right for a mean-subtracted image).
    """
    num_boxes = boxes.shape[0]
    if num_boxes == 0:
        return image.new_zeros((0, 3, crop_size, crop_size))
    if not 0 <= 2 * context_pad < crop_size:
        raise ValueError(f"context_pad {context_pad} must be >= 0 and below half of crop_size {crop_size}")
    fill = torch.zeros(3) if fill is None else fill
    fill = fill.to(device=image.device, dtype=image.dtype).view(3, 1, 1)
    padded = F.pad(image - fill, (1, 1, 1, 1))  # [3, H + 2, W + 2]; 0 outside = fill
    boxes = boxes.to(image.dtype)
    center = (boxes[:, :2] + boxes[:, 2:]) / 2  # [R, 2]
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * (crop_size / (crop_size - 2 * context_pad))  # [R, 2], with context
    big = torch.cat([center - half, center + half], dim=1) + 1.0  # [R, 4]; +1: the pad
    rois = torch.cat([big.new_zeros((num_boxes, 1)), big], dim=1)  # [R, 5]
    crops = roi_align(padded[None], rois, output_size=crop_size, spatial_scale=1.0, sampling_ratio=1,
                      aligned=True)  # [R, 3, crop, crop]
    return crops + fill


def normalize_image(image: np.ndarray, *, pixel_mean, pixel_std, device: torch.device) -> Tensor:
    """uint8 RGB [H, W, 3] -> normalised float [3, H, W] on ``device`` (``normalize_pixels``)."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8, order="C")).to(device).permute(2, 0, 1).float()
    return normalize_pixels(x, pixel_mean, pixel_std)  # [3, H, W]


class RegionNet(nn.Module):
    """The CNN of R-CNN on warped crops: crops [B, 3, crop, crop] -> (pool5 [B, C, S, S], fc7 [B, D])."""

    def __init__(self, *, body: nn.Module, head: nn.Module, roi_size: int):
        super().__init__()
        self.body = body
        self.head = head
        self.roi_size = roi_size

    def forward(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        pool5 = F.adaptive_max_pool2d(self.body(crops), self.roi_size)  # [B, C, S, S]
        return pool5, self.head(pool5)  # [B, D]


class FineTuneNet(nn.Module):
    """RegionNet + a new (K+1)-way classifier on fc7 (index 0 = background), for fine-tuning."""

    def __init__(self, *, net: RegionNet, head_dim: int, num_classes: int):
        super().__init__()
        self.net = net
        self.cls_score = nn.Linear(head_dim, num_classes + 1)
        nn.init.normal_(self.cls_score.weight, std=0.01)  # [RCNN] fc8_pascal filler
        nn.init.zeros_(self.cls_score.bias)

    def forward(self, crops: Tensor) -> Tensor:
        return self.cls_score(self.net(crops)[1])  # [B, K + 1]


def region_features(net: RegionNet, image: Tensor, boxes: Tensor, *, crop_size: int, context_pad: int,
                    batch_size: int, amp: bool) -> tuple[Tensor, Tensor]:
    """pool5 [R, D5] (flattened) and fc7 [R, D] of regions of one normalised image, ``batch_size``
    crops at a time (channels-last: ``net`` is best an ``inference_copy``)."""
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, 0)), boxes.new_zeros((0, 0))
    pool5_out, fc7_out = [], []
    for start in range(0, boxes.shape[0], batch_size):
        crops = warp_regions(image, boxes[start:start + batch_size], crop_size=crop_size, context_pad=context_pad)
        with autocast(image.device, amp):
            pool5, fc7 = net(crops.contiguous(memory_format=torch.channels_last))
        pool5_out.append(pool5.flatten(1).float())
        fc7_out.append(fc7.float())
    return torch.cat(pool5_out), torch.cat(fc7_out)


class RCNN(Detector):
    """R-CNN at test time: warp each proposal, run the CNN, score with SVMs, regress boxes.

    ``svm_weight`` [K, D] and ``svm_bias`` [K] act on fc7 x ``feat_scale``; ``bbox_weight``
    [K, D5, 4] and ``bbox_bias`` [K, 4] on raw flattened pool5, giving deltas normalised by
    ``bbox_target_mean`` / ``bbox_target_std`` [K, 4]. They are buffers outside ``state_dict()``
    (the checkpoint's ``extra``). Other keywords go to ``Detector``.
    """

    kind = "rcnn"

    def __init__(self, *, backbone: Backbone, crop_size: int, context_pad: int = 16, svm_weight: Tensor,
                 svm_bias: Tensor, feat_scale: float, bbox_weight: Tensor, bbox_bias: Tensor,
                 bbox_target_mean: Tensor, bbox_target_std: Tensor, test_chunk: int = 512,
                 class_names: list[str], score_thresh: float = 0.05, nms_thresh: float = 0.3,
                 detections_per_image: int = 100, per_class_top_k: int = 0, category_ids: list[int] | None = None,
                 proposal_settings: dict | None = None, proposal_top_k: int = 0, backbone_name: str = "",
                 amp: bool = True, box_regression: bool = True):
        super().__init__(class_names=class_names, score_thresh=score_thresh, nms_thresh=nms_thresh,
                         detections_per_image=detections_per_image, per_class_top_k=per_class_top_k,
                         category_ids=category_ids, proposal_settings=proposal_settings,
                         proposal_top_k=proposal_top_k, backbone_name=backbone_name, amp=amp,
                         box_regression=box_regression)
        k, d = self.num_classes, backbone.head_dim
        d5 = backbone.out_channels * backbone.roi_size ** 2
        for name, t, shape in (("svm_weight", svm_weight, (k, d)), ("svm_bias", svm_bias, (k,)),
                               ("bbox_weight", bbox_weight, (k, d5, 4)), ("bbox_bias", bbox_bias, (k, 4)),
                               ("bbox_target_mean", bbox_target_mean, (k, 4)),
                               ("bbox_target_std", bbox_target_std, (k, 4))):
            if tuple(t.shape) != shape:
                raise ValueError(f"RCNN: {name} has shape {tuple(t.shape)}, expected {shape} "
                                 f"({k} classes, fc7 {d}, pool5 {d5})")
            self.register_buffer(name, t.detach().float().clone(), persistent=False)
        if test_chunk <= 0:
            raise ValueError(f"test_chunk must be > 0, got {test_chunk}")
        self.net = RegionNet(body=backbone.body, head=backbone.head, roi_size=backbone.roi_size)
        self.pixel_mean = tuple(backbone.pixel_mean)
        self.pixel_std = tuple(backbone.pixel_std)
        self.crop_size, self.context_pad = crop_size, context_pad
        self.feat_scale = float(feat_scale)
        self.test_chunk = test_chunk

    def make_inference_module(self) -> RegionNet:
        return inference_copy(self.net)

    def _score(self, image: np.ndarray, proposal_boxes: Tensor, timer: StageTimer) -> ProposalScores:
        """SVM margins squashed by a sigmoid (monotone: AP is unchanged; margin 0 is 0.5), in
        chunks of ``test_chunk`` proposals; timer stages: warp, features, svm, bbox_reg."""
        device, num_classes = self.device, self.num_classes
        with timer("warp"):
            image_t = normalize_image(image, pixel_mean=self.pixel_mean, pixel_std=self.pixel_std, device=device)
        bbox_weight = self.bbox_weight.permute(1, 0, 2).reshape(self.bbox_weight.shape[1], -1)  # [D5, K * 4]
        net = self.inference_module()
        scores, deltas = [], []
        for start in range(0, proposal_boxes.shape[0], self.test_chunk):
            boxes = proposal_boxes[start:start + self.test_chunk]
            with timer("warp"):
                crops = warp_regions(image_t, boxes, crop_size=self.crop_size, context_pad=self.context_pad)
                crops = crops.contiguous(memory_format=torch.channels_last)  # [r, 3, crop, crop]
            with timer("features"), autocast(device, self.amp):
                pool5, fc7 = net(crops)
            with timer("svm"):
                margin = (fc7.float() * self.feat_scale) @ self.svm_weight.T + self.svm_bias  # [r, K]
                scores.append(torch.sigmoid(margin))
            with timer("bbox_reg"):
                d = (pool5.flatten(1).float() @ bbox_weight).view(-1, num_classes, 4) + self.bbox_bias  # [r, K, 4]
                deltas.append(d * self.bbox_target_std + self.bbox_target_mean)
        return ProposalScores(proposal_boxes, torch.cat(scores), torch.cat(deltas))


