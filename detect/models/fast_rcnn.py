"""Fast R-CNN ([FRCN] Girshick 2015): one conv feature map per image, RoI pooling, two siblings.

Shapes: N images in the mini-batch, R RoIs (summed over its images, or the proposals of one
test image), P proposals and G gt boxes of one image, K object classes (background is class 0,
not counted in K), C channels of the feature map, S x S the pooled size, D the head's width.

Naming: ``proposal_boxes`` and ``gt_boxes`` are xyxy float pixels of the ORIGINAL image;
``rois`` [R, 5] are (batch index, x1, y1, x2, y2) in pixels of the RESIZED image the network
sees; ``box_deltas`` from the network are normalised by ``bbox_std`` (``ProposalScores``'
``deltas`` are not). Deltas are scale invariant (tx = dx / w, tw = log(w' / w)): predicted in the
resized image, they apply unchanged to boxes of the original image.

Training (sampling, loss, mini-batches) is in ``detect.training.fast_rcnn_train``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_area, roi_align, roi_pool

from detect.common.runtime import autocast
from detect.models.backbones import Backbone, FcHead, inference_copy, normalize_pixels
from detect.models.detector import Detector, ProposalScores, StageTimer


def resize_scale(height: int, width: int, target_size: int, max_size: int) -> float:
    """[FRCN] ``prep_im_for_blob``: the shorter side becomes ``target_size`` unless the longer
    side would then exceed ``max_size``, in which case the longer side becomes ``max_size``."""
    scale = target_size / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    return scale


def prepare_image(image: Tensor, *, target_size: int, max_size: int,
                  pixel_mean: Sequence[float], pixel_std: Sequence[float],
                  flip: bool = False) -> tuple[Tensor, tuple[float, float]]:
    """uint8 RGB [H, W, 3] (on any device) -> normalised float [3, h, w] and (scale_x, scale_y).

    Optionally mirrored, then resized bilinearly by ``resize_scale`` (no anti-aliasing, as
    [FRCN]'s cv2.resize), then normalised. x' = x * scale_x maps original pixels to resized ones.
    """
    height, width = int(image.shape[0]), int(image.shape[1])
    scale = resize_scale(height, width, target_size, max_size)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    x = image.permute(2, 0, 1).unsqueeze(0).float()  # [1, 3, H, W]
    if flip:
        x = x.flip(-1)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return normalize_pixels(x[0], pixel_mean, pixel_std), (new_w / width, new_h / height)


class FastRCNN(Detector):
    """Backbone body -> RoI pool (S x S, 1/stride) -> head -> cls_score [K+1], bbox_pred [4K].

    Class-specific box regression (no background row). Test images: shorter side ``test_scale``
    (or each of ``test_scales``, [FRCN]'s multi-scale test: ``assign_levels``), longer side <=
    ``test_max_size``, at most ``roi_chunk`` RoIs through the head at once. ``roi_sampling_ratio``
    and ``roi_aligned`` are ``torchvision.ops.roi_align``'s. Other keywords go to ``Detector``.
    """

    kind = "fast_rcnn"

    def __init__(self, *, backbone: Backbone, roi_op: str = "roi_pool", roi_sampling_ratio: int = 2,
                 roi_aligned: bool = True, bbox_std: Sequence[float] = (0.1, 0.1, 0.2, 0.2), test_scale: int = 600,
                 test_max_size: int = 1000, test_scales: Sequence[int] | None = None, roi_chunk: int = 1024,
                 class_names: list[str], score_thresh: float = 0.05, nms_thresh: float = 0.3,
                 detections_per_image: int = 100, per_class_top_k: int = 0, category_ids: list[int] | None = None,
                 proposal_settings: dict | None = None, proposal_top_k: int = 0, backbone_name: str = "",
                 amp: bool = True, box_regression: bool = True):
        super().__init__(class_names=class_names, score_thresh=score_thresh, nms_thresh=nms_thresh,
                         detections_per_image=detections_per_image, per_class_top_k=per_class_top_k,
                         category_ids=category_ids, proposal_settings=proposal_settings,
                         proposal_top_k=proposal_top_k, backbone_name=backbone_name, amp=amp,
                         box_regression=box_regression)
        if roi_op not in ("roi_pool", "roi_align"):
            raise ValueError(f"roi_op must be 'roi_pool' or 'roi_align', got {roi_op!r}")
        if len(bbox_std) != 4 or any(s <= 0 for s in bbox_std):
            raise ValueError(f"bbox_std must be 4 positive numbers, got {bbox_std!r}")
        test_scales = list(test_scales) if test_scales else [test_scale]
        if min(test_scales) <= 0 or test_max_size <= 0 or roi_chunk <= 0:
            raise ValueError("test_scale(s), test_max_size and roi_chunk must be positive")
        if roi_sampling_ratio < 0:
            raise ValueError(f"roi_sampling_ratio must be >= 0 (0 = adaptive), got {roi_sampling_ratio}")
        self.body = backbone.body
        self.head = backbone.head
        self.roi_op = roi_op
        self.roi_sampling_ratio = roi_sampling_ratio
        self.roi_aligned = roi_aligned
        self.roi_size = backbone.roi_size
        self.stride = backbone.stride
        self.pixel_mean = tuple(backbone.pixel_mean)
        self.pixel_std = tuple(backbone.pixel_std)
        self.test_scales = test_scales
        self.test_max_size = test_max_size
        self.roi_chunk = roi_chunk
        self.cls_score = nn.Linear(backbone.head_dim, self.num_classes + 1)
        self.bbox_pred = nn.Linear(backbone.head_dim, 4 * self.num_classes)
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):  # [FRCN]'s Gaussian init
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        self.register_buffer("bbox_std", torch.tensor(bbox_std, dtype=torch.float32), persistent=False)

    def forward(self, images: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised images [N, 3, H, W] and rois [R, 5] (batch index, xyxy in those images'
        pixels) -> (class_logits [R, K+1], box_deltas [R, K, 4] normalised by bbox_std)."""
        return self.roi_heads(self.features(images), rois)

    def features(self, images: Tensor, body: nn.Module | None = None) -> Tensor:
        """Normalised images [N, 3, H, W] -> feature map [N, C, ceil(H / stride), ceil(W / stride)];
        ``body``: ``self.body``, or at test time its inference copy (fed channels-last).

        The images are zero-padded on the right and bottom to a multiple of ``stride`` first: then
        TensorFlow "same" padding (efficientnet_lite0), which pads odd sizes one pixel more on the
        left or top, sees even sizes only, and the feature grid's offset is one constant.
        """
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % self.stride, -width % self.stride
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))  # [N, 3, H', W'], multiples of stride
        if body is None:
            return self.body(images)  # [N, C, H' / stride, W' / stride]
        return body(images.contiguous(memory_format=torch.channels_last)).contiguous()

    def make_inference_module(self) -> nn.Module:
        return inference_copy(self.body)

    def roi_heads(self, features: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """Feature map [N, C, h, w], rois [R, 5] -> (class_logits [R, K+1], box_deltas [R, K, 4])."""
        # RoI ops in float32 (as torchvision's autocast rule does): bf16 would round coordinates.
        features, rois = features.float(), rois.float()
        if self.roi_op == "roi_pool":  # [FRCN] max pooling into S x S bins
            pooled = roi_pool(features, rois, self.roi_size, 1.0 / self.stride)  # [R, C, S, S]
        else:
            pooled = roi_align(features, rois, self.roi_size, 1.0 / self.stride,
                               sampling_ratio=self.roi_sampling_ratio, aligned=self.roi_aligned)  # [R, C, S, S]
        x = self.head(pooled)  # [R, D]
        # The two output layers in float32, outside autocast: bf16 logits would quantise scores into ties.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            return self.cls_score(x), self.bbox_pred(x).view(-1, self.num_classes, 4)  # [R, K+1], [R, K, 4]

    def _score(self, image: np.ndarray, proposal_boxes: Tensor, timer: StageTimer) -> ProposalScores:
        """Softmax scores (``score_proposals``); call ``.eval()`` first (dropout)."""
        device = self.device
        num_props, num_classes = proposal_boxes.shape[0], self.num_classes
        with timer("backbone"):
            pixels = torch.tensor(image, dtype=torch.uint8, device=device)  # [H, W, 3], a copy
            body = self.inference_module()
            levels = []  # (features [1, C, h, w], (scale_x, scale_y)) per pyramid level
            for size in self.test_scales:
                x, factors = prepare_image(pixels, target_size=size, max_size=self.test_max_size,
                                           pixel_mean=self.pixel_mean, pixel_std=self.pixel_std)
                with autocast(device, self.amp):
                    levels.append((self.features(x[None], body), factors))
        with timer("roi_head"):
            level_of = assign_levels(proposal_boxes, torch.tensor([f for _, f in levels], device=device))  # [R]
            logits = torch.zeros((num_props, num_classes + 1), device=device)  # [R, K+1]
            deltas = torch.zeros((num_props, num_classes, 4), device=device)  # [R, K, 4]
            for level, (features, (scale_x, scale_y)) in enumerate(levels):
                index = torch.nonzero(level_of == level).flatten()  # [R_l]
                scale = torch.tensor([scale_x, scale_y, scale_x, scale_y], device=device)
                rois = torch.cat([proposal_boxes.new_zeros((len(index), 1)), proposal_boxes[index] * scale], dim=1)
                with autocast(device, self.amp):
                    for start in range(0, len(index), self.roi_chunk):
                        chunk = index[start:start + self.roi_chunk]  # float32 outputs (roi_heads)
                        logits[chunk], deltas[chunk] = self.roi_heads(features, rois[start:start + self.roi_chunk])
            scores = torch.softmax(logits, dim=1)[:, 1:]  # [R, K], background dropped
            deltas = deltas * self.bbox_std  # [R, K, 4], un-normalised
        return ProposalScores(proposal_boxes, scores, deltas)

    @torch.no_grad()
    def apply_svd(self, fc6_rank: int = 1024, fc7_rank: int = 256) -> None:
        """[FRCN] section 3.1: fc6 and fc7 become their truncated SVDs (``_svd_linear``), in place."""
        if not isinstance(self.head, FcHead) or not isinstance(self.head.fc6, nn.Linear):
            raise ValueError("truncated SVD needs a head with plain fc6/fc7 layers (vgg16, alexnet, or "
                             "a conv backbone with model.head_dim > 0), applied once")
        self.head.fc6 = _svd_linear(self.head.fc6, fc6_rank)
        self.head.fc7 = _svd_linear(self.head.fc7, fc7_rank)


def assign_levels(proposal_boxes: Tensor, factors: Tensor) -> Tensor:
    """The pyramid level [R] (int64) each proposal [R, 4] is scored on, given the levels'
    (scale_x, scale_y) factors [L, 2]: the level where the proposal's scaled area is closest to
    224 x 224 (fast-rcnn ``lib/fast_rcnn/test.py::_project_im_rois``, with continuous widths)."""
    scaled_areas = box_area(proposal_boxes)[:, None] * (factors[:, 0] * factors[:, 1])[None, :]  # [R, L]
    return (scaled_areas - 224 * 224).abs().argmin(dim=1)  # first level on ties, as np.argmin


def _svd_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Linear W [out, in] -> Sequential(Linear(in, t, no bias), Linear(t, out)) whose product is
    W's rank-t truncated SVD (t <= min(out, in)), from the eigenvectors of the smaller Gram
    matrix in float64: U_t^T W and U_t when out <= in, as [FRCN], else V_t^T and W V_t."""
    weight = layer.weight.detach().double()  # [out, in]
    out_features, in_features = weight.shape
    t = max(1, min(rank, out_features, in_features))
    if out_features <= in_features:
        _, u = torch.linalg.eigh(weight @ weight.T)  # eigenvalues ascending: [out, out]
        u_t = u[:, -t:].flip(1)  # [out, t]
        first_weight, second_weight = u_t.T @ weight, u_t  # [t, in], [out, t]
    else:
        _, v = torch.linalg.eigh(weight.T @ weight)  # [in, in]
        v_t = v[:, -t:].flip(1)  # [in, t]
        first_weight, second_weight = v_t.T, weight @ v_t  # [t, in], [out, t]
    first = nn.Linear(in_features, t, bias=False)
    second = nn.Linear(t, out_features, bias=layer.bias is not None)
    first.weight.copy_(first_weight)
    second.weight.copy_(second_weight)
    if layer.bias is not None:
        second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).to(layer.weight.device, layer.weight.dtype)


