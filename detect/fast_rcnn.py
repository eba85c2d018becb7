"""Fast R-CNN ([FRCN] Girshick 2015): one conv feature map per image, RoI pooling, two siblings.

Shape shorthand used in this file:
    N: number of images in the mini-batch
    R: number of RoIs, summed over the images of the batch (or the proposals of one test image)
    P: number of proposals of one image;  G: number of ground-truth boxes of one image
    K: number of object classes (background is class 0 and is not counted in K)
    C, S: channels of the feature map; RoI pooled size (S x S)
    D: width of the head's output feature (head_dim)

Naming: ``proposal_boxes`` and ``gt_boxes`` are xyxy float pixels of the ORIGINAL image;
``rois`` [R, 5] are (batch index, x1, y1, x2, y2) in pixels of the RESIZED image the network
sees; ``box_deltas`` from the network are normalised by ``bbox_std`` ([FRCN]'s
BBOX_NORMALIZE_STDS), ``deltas`` in ``ProposalScores`` are not. Deltas are scale invariant
(tx = dx / w, tw = log(w' / w)), so deltas predicted in the resized image apply unchanged to
boxes of the original image, even when the two axes are scaled by slightly different factors.

Training ([FRCN] section 2.3, ``lib/roi_data_layer/minibatch.py``): hierarchical sampling of N
images, then R / N RoIs per image with 25% foreground; multi-task loss = log loss + lambda *
smooth-L1 on the true class's deltas of foreground RoIs.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool

from detect.backbones import Backbone, FcHead, build_backbone
from detect.boxes import box_iou, encode_boxes, flip_boxes
from detect.config import Config, from_dict, to_dict
from detect.data import ImageReadError, ImageRecord, read_image
from detect.detector import Detector, ProposalScores, StageTimer

__all__ = ["FastRCNN", "resize_scale", "prepare_image", "sample_rois", "fast_rcnn_loss", "TrainBatch",
           "FastRCNNTrainData", "build_fast_rcnn", "build_from_checkpoint", "build_optimizer", "train"]


# ----------------------------------------------------------------------------------------------
# Image preparation (shared by training and test)
# ----------------------------------------------------------------------------------------------


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

    Optionally mirrored left-right first; then resized bilinearly (as [FRCN]'s cv2.resize,
    no anti-aliasing) by ``resize_scale``; then ``(x / 255 - mean) / std``. The returned
    per-axis factors map original pixels to resized ones: x' = x * scale_x.
    """
    height, width = int(image.shape[0]), int(image.shape[1])
    scale = resize_scale(height, width, target_size, max_size)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    x = image.permute(2, 0, 1).unsqueeze(0).float()  # [1, 3, H, W]
    if flip:
        x = x.flip(-1)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    mean = torch.as_tensor(pixel_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.as_tensor(pixel_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    x = (x - mean) / std
    return x[0], (new_w / width, new_h / height)


def _autocast(device: torch.device):
    """bf16 (or fp16) autocast on CUDA; a no-op context elsewhere."""
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class FastRCNN(Detector):
    """Backbone body -> RoI pool (S x S, 1/stride) -> head -> cls_score [K+1], bbox_pred [4K].

    Class-specific box regression, one (tx, ty, tw, th) per object class (no background row).
    Test-time resizing: shorter side ``test_scale``, longer side <= ``test_max_size`` ([FRCN]
    600 / 1000). ``roi_chunk`` bounds the RoIs run through the head at once at test time (the
    memory of conv heads grows with R x S x S).
    """

    kind = "fast_rcnn"

    def __init__(self, *, backbone: Backbone, class_names: list[str], roi_op: str = "roi_pool",
                 bbox_std: Sequence[float] = (0.1, 0.1, 0.2, 0.2), test_scale: int = 600,
                 test_max_size: int = 1000, score_thresh: float = 0.05, nms_thresh: float = 0.3,
                 detections_per_image: int = 100, roi_chunk: int = 1024):
        super().__init__(class_names=class_names, score_thresh=score_thresh, nms_thresh=nms_thresh,
                         detections_per_image=detections_per_image)
        if roi_op not in ("roi_pool", "roi_align"):
            raise ValueError(f"roi_op must be 'roi_pool' or 'roi_align', got {roi_op!r}")
        if len(bbox_std) != 4 or any(s <= 0 for s in bbox_std):
            raise ValueError(f"bbox_std must be 4 positive numbers, got {bbox_std!r}")
        if test_scale <= 0 or test_max_size <= 0 or roi_chunk <= 0:
            raise ValueError("test_scale, test_max_size and roi_chunk must be positive")
        self.body = backbone.body
        self.head = backbone.head
        self.roi_op = roi_op
        self.roi_size = backbone.roi_size
        self.stride = backbone.stride
        self.pixel_mean = tuple(backbone.pixel_mean)
        self.pixel_std = tuple(backbone.pixel_std)
        self.test_scale = test_scale
        self.test_max_size = test_max_size
        self.roi_chunk = roi_chunk
        self.backbone_name = ""  # set by build_fast_rcnn; reported in metrics.json
        num_classes = len(self.class_names)
        self.cls_score = nn.Linear(backbone.head_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(backbone.head_dim, 4 * num_classes)
        # [FRCN]: Gaussian init, std 0.01 for the classifier and 0.001 for the box regressor.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.register_buffer("bbox_std", torch.tensor(bbox_std, dtype=torch.float32), persistent=False)

    def forward(self, images: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised images [N, 3, H, W] and rois [R, 5] (batch index, xyxy in those images'
        pixels) -> (class_logits [R, K+1], box_deltas [R, K, 4] normalised by bbox_std)."""
        features = self.body(images)  # [N, C, H/16, W/16]
        return self.roi_heads(features, rois)

    def roi_heads(self, features: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """Feature map [N, C, h, w], rois [R, 5] -> (class_logits [R, K+1], box_deltas [R, K, 4])."""
        # RoI ops in float32 (as torchvision's autocast rule does): bf16 would round coordinates.
        features, rois = features.float(), rois.float()
        if self.roi_op == "roi_pool":  # [FRCN] max pooling into S x S bins
            pooled = roi_pool(features, rois, self.roi_size, 1.0 / self.stride)  # [R, C, S, S]
        else:
            pooled = roi_align(features, rois, self.roi_size, 1.0 / self.stride,
                               sampling_ratio=2, aligned=True)  # [R, C, S, S]
        x = self.head(pooled)  # [R, D]
        class_logits = self.cls_score(x)  # [R, K+1]
        box_deltas = self.bbox_pred(x).view(-1, self.num_classes, 4)  # [R, K, 4]
        return class_logits, box_deltas

    @torch.no_grad()
    def score_proposals(self, image: np.ndarray, proposal_boxes: Tensor,
                        timer: StageTimer | None = None) -> ProposalScores:
        """Softmax scores [R, K] and un-normalised deltas [R, K, 4] of each proposal.

        ``image``: uint8 RGB [H, W, 3]; ``proposal_boxes``: [R, 4] xyxy original pixels. Call
        ``.eval()`` first (dropout). Zero proposals give empty outputs without running the net.
        """
        timer = timer or StageTimer(self.device)
        device = self.device
        proposal_boxes = proposal_boxes.to(device=device, dtype=torch.float32).reshape(-1, 4)
        num_props, num_classes = proposal_boxes.shape[0], self.num_classes
        if num_props == 0:
            return ProposalScores(proposal_boxes, torch.zeros((0, num_classes), device=device),
                                  torch.zeros((0, num_classes, 4), device=device))
        with timer("backbone"):
            pixels = torch.tensor(image, dtype=torch.uint8, device=device)  # [H, W, 3], a copy
            x, (scale_x, scale_y) = prepare_image(pixels, target_size=self.test_scale,
                                                  max_size=self.test_max_size,
                                                  pixel_mean=self.pixel_mean, pixel_std=self.pixel_std)
            with _autocast(device):
                features = self.body(x[None])  # [1, C, h, w]
        with timer("roi_head"):
            scale = torch.tensor([scale_x, scale_y, scale_x, scale_y], device=device)
            rois = torch.cat([proposal_boxes.new_zeros((num_props, 1)), proposal_boxes * scale], dim=1)
            logits, deltas = [], []
            with _autocast(device):
                for start in range(0, num_props, self.roi_chunk):
                    chunk_logits, chunk_deltas = self.roi_heads(features, rois[start:start + self.roi_chunk])
                    logits.append(chunk_logits.float())
                    deltas.append(chunk_deltas.float())
            scores = torch.softmax(torch.cat(logits), dim=1)[:, 1:]  # [R, K], background dropped
            deltas = torch.cat(deltas) * self.bbox_std  # [R, K, 4], un-normalised
        return ProposalScores(proposal_boxes, scores, deltas)

    @torch.no_grad()
    def apply_svd(self, fc6_rank: int = 1024, fc7_rank: int = 256) -> None:
        """[FRCN] section 3.1: replace fc6 and fc7 by their truncated SVDs, in place.

        A Linear W [out, in] becomes Linear(in, t, no bias) with weight Sigma_t V_t^T, then
        Linear(t, out) with weight U_t and W's bias (see ``_svd_linear``). Ranks above
        min(out, in) are clamped (then the result equals the original up to rounding). Only
        heads with fc layers. VGG16's fc6 takes about a minute on a 2-core CPU.
        """
        if not isinstance(self.head, FcHead) or not isinstance(self.head.fc6, nn.Linear):
            raise ValueError("truncated SVD needs a head with plain fc6/fc7 layers (vgg16, alexnet, or "
                             "a conv backbone with model.head_dim > 0), applied once")
        self.head.fc6 = _svd_linear(self.head.fc6, fc6_rank)
        self.head.fc7 = _svd_linear(self.head.fc7, fc7_rank)


def _svd_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Linear W [out, in] -> Sequential(Linear(in, t, no bias), Linear(t, out)) whose product is
    W's rank-t truncated SVD, U_t Sigma_t V_t^T.

    Computed from the eigenvectors of the smaller Gram matrix (W W^T or W^T W) in float64: for
    VGG16's fc6 (4096 x 25088) that takes seconds where a full SVD takes minutes on a CPU. When
    out <= in, the layers are Sigma_t V_t^T = U_t^T W and U_t, as [FRCN]; otherwise V_t^T and
    W V_t = U_t Sigma_t. Neither divides by a singular value, and at full rank the product is W.
    """
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


# ----------------------------------------------------------------------------------------------
# Training targets and loss
# ----------------------------------------------------------------------------------------------


def sample_rois(proposal_boxes: Tensor, gt_boxes: Tensor, gt_classes: Tensor, *, num_rois: int = 64,
                fg_fraction: float = 0.25, fg_iou: float = 0.5, bg_iou_low: float = 0.1,
                bg_iou_high: float = 0.5, bbox_std: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
                generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """[FRCN] ``_sample_rois``: up to ``num_rois`` RoIs of one image, ``fg_fraction`` foreground.

    ``proposal_boxes`` [P, 4], ``gt_boxes`` [G, 4] (xyxy, same pixels; pass non-difficult gt
    only), ``gt_classes`` [G] in 1..K. The ground-truth boxes join the candidates. Foreground:
    IoU >= ``fg_iou`` with some gt box (label = its class); background: max IoU in
    [``bg_iou_low``, ``bg_iou_high``) (label 0). As [FRCN], fewer foreground than the quota means
    more background. Unlike [FRCN] (which drops such images), when the [low, high) band holds too
    few candidates the background is topped up with IoU < ``bg_iou_low`` ones, so images without
    gt still train the background class; with too few candidates in all, fewer RoIs come back
    (zero when P = G = 0).

    Returns ``roi_boxes`` [R, 4], ``labels`` [R] (foreground first) and ``box_targets`` [R, 4]:
    deltas to the matched gt divided by ``bbox_std``, zeros for background.
    """
    device = proposal_boxes.device
    boxes = torch.cat([gt_boxes.to(device, torch.float32), proposal_boxes.float()])  # [G + P, 4]
    gt_boxes = gt_boxes.to(device, torch.float32)
    gt_classes = gt_classes.to(device, torch.int64)
    if gt_boxes.shape[0] > 0:
        max_iou, matched_gt = box_iou(boxes, gt_boxes).max(dim=1)  # [G + P]
    else:
        max_iou = boxes.new_zeros(boxes.shape[0])
        matched_gt = torch.zeros(boxes.shape[0], dtype=torch.int64, device=device)

    def pick(candidates: Tensor, count: int) -> Tensor:
        order = torch.randperm(candidates.numel(), generator=generator).to(device)
        return candidates[order[:count]]

    fg = pick(torch.nonzero(max_iou >= fg_iou).flatten(), int(round(fg_fraction * num_rois)))
    num_bg = num_rois - fg.numel()
    in_band = (max_iou >= bg_iou_low) & (max_iou < bg_iou_high)
    bg = pick(torch.nonzero(in_band).flatten(), num_bg)
    if bg.numel() < num_bg:
        bg = torch.cat([bg, pick(torch.nonzero(max_iou < bg_iou_low).flatten(), num_bg - bg.numel())])
    keep = torch.cat([fg, bg])  # [R]
    roi_boxes = boxes[keep]  # [R, 4]
    labels = torch.zeros(keep.numel(), dtype=torch.int64, device=device)  # [R]
    box_targets = boxes.new_zeros((keep.numel(), 4))  # [R, 4]
    if fg.numel() > 0:
        labels[: fg.numel()] = gt_classes[matched_gt[fg]]
        weights = tuple(1.0 / s for s in bbox_std)
        box_targets[: fg.numel()] = encode_boxes(boxes[fg], gt_boxes[matched_gt[fg]], weights)
    return roi_boxes, labels, box_targets


def fast_rcnn_loss(class_logits: Tensor, box_deltas: Tensor, labels: Tensor, box_targets: Tensor, *,
                   bbox_loss_weight: float = 1.0) -> dict[str, Tensor]:
    """[FRCN] eq. 1: log loss over all RoIs + lambda * smooth-L1 (beta = 1) on foreground RoIs.

    ``class_logits`` [R, K+1], ``box_deltas`` [R, K, 4] and ``box_targets`` [R, 4] (both
    normalised by bbox_std), ``labels`` [R] in 0..K. Only the true class's deltas of foreground
    RoIs enter the box loss, which is summed and divided by R (as [FRCN]'s SmoothL1Loss layer
    normalises by the batch). No foreground gives a box loss of exactly 0; R = 0 gives zero
    losses that still carry gradients.
    """
    num_rois = class_logits.shape[0]
    if num_rois == 0:
        zero = class_logits.sum() * 0.0 + box_deltas.sum() * 0.0
        return {"loss_cls": zero, "loss_box": zero.clone()}
    loss_cls = F.cross_entropy(class_logits.float(), labels)
    fg = torch.nonzero(labels > 0).flatten()  # [F]
    fg_deltas = box_deltas[fg, labels[fg] - 1].float()  # [F, 4]
    loss_box = F.smooth_l1_loss(fg_deltas, box_targets[fg].float(), beta=1.0, reduction="sum")
    return {"loss_cls": loss_cls, "loss_box": loss_box * (bbox_loss_weight / num_rois)}


# ----------------------------------------------------------------------------------------------
# Training mini-batches ([FRCN] hierarchical sampling)
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainBatch:
    images: Tensor  # [N, 3, H, W] normalised, zero-padded on the right and bottom
    rois: Tensor  # [R, 5] (batch index, x1, y1, x2, y2) in resized-image pixels
    labels: Tensor  # [R] int64 in 0..K
    box_targets: Tensor  # [R, 4] normalised by bbox_std (zeros for background)
    image_ids: list[int]
    skipped_files: list[str]  # unreadable images passed over while building this batch (reasons)


def _generator(*keys: int) -> torch.Generator:
    """A torch.Generator seeded from a tuple of integers (well mixed by numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(k) % 2**32 for k in keys]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _valid_boxes(boxes: np.ndarray) -> np.ndarray:
    """Mask [B] of the boxes [B, 4] that are finite with positive width and height."""
    ok = np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return ok


class FastRCNNTrainData:
    """Builds the mini-batch of any iteration deterministically from (seed, iteration).

    Image order: per epoch a permutation of ``records`` drawn from a generator seeded with
    (seed, epoch); the epochs are concatenated and global batch i takes the next
    ``images_per_batch * world_size`` positions, of which rank r takes its own
    ``images_per_batch``. Scale (from ``scales``), flip and RoI sampling of each image use a
    generator seeded with (seed, iteration, global image slot), so a resumed run rebuilds
    exactly the batches it would have seen, with no sampler state in the checkpoint.
    An image that cannot be read is passed over for the next one in the sequence and named in
    ``TrainBatch.skipped_files`` (the first time only); difficult and degenerate gt boxes are
    left out ([FRCN] trains without VOC's difficult objects).
    ``get_proposals(image_id)`` returns proposals [P, 4] xyxy in original-image pixels.
    """

    def __init__(self, *, records: list[ImageRecord], get_proposals: Callable[[int], np.ndarray],
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], images_per_batch: int = 2,
                 rois_per_image: int = 64, scales: Sequence[int] = (600,), max_size: int = 1000,
                 flip: bool = True, fg_fraction: float = 0.25, fg_iou: float = 0.5,
                 bg_iou_low: float = 0.1, bg_iou_high: float = 0.5,
                 bbox_std: Sequence[float] = (0.1, 0.1, 0.2, 0.2), seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not records:
            raise ValueError("no training images")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if images_per_batch <= 0 or rois_per_image <= 0 or not scales:
            raise ValueError("images_per_batch and rois_per_image must be positive and scales non-empty")
        self.records = list(records)
        self.get_proposals = get_proposals
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.images_per_batch, self.rois_per_image = images_per_batch, rois_per_image
        self.scales, self.max_size, self.flip = list(scales), max_size, flip
        self.sampling = dict(num_rois=rois_per_image, fg_fraction=fg_fraction, fg_iou=fg_iou,
                             bg_iou_low=bg_iou_low, bg_iou_high=bg_iou_high, bbox_std=tuple(bbox_std))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._permutations: dict[int, np.ndarray] = {}
        self._unreadable: set[str] = set()

    def record_at(self, position: int) -> ImageRecord:
        """The record at ``position`` of the concatenated per-epoch permutations."""
        epoch, index = divmod(position, len(self.records))
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = torch.randperm(len(self.records), generator=_generator(self.seed, epoch)).numpy()
            self._permutations = {epoch: perm}  # batches move forward: keep only the newest epoch
        return self.records[int(perm[index])]

    def _read(self, position: int, skipped: list[str]) -> tuple[ImageRecord, np.ndarray]:
        for offset in range(len(self.records)):
            record = self.record_at(position + offset)
            if record.file_name in self._unreadable:
                continue
            try:
                return record, read_image(record.file_name)
            except ImageReadError as e:
                self._unreadable.add(record.file_name)
                skipped.append(str(e))
        raise ValueError(f"none of the {len(self.records)} training images can be read "
                           f"(e.g. {sorted(self._unreadable)[:3]})")

    def batch(self, iteration: int) -> TrainBatch:
        first = (iteration * self.world_size + self.rank) * self.images_per_batch
        images, rois, labels, targets, image_ids, skipped = [], [], [], [], [], []
        for slot in range(self.images_per_batch):
            record, image = self._read(first + slot, skipped)
            generator = _generator(self.seed, iteration, self.rank * self.images_per_batch + slot)
            flip = self.flip and bool(torch.rand((), generator=generator) < 0.5)
            scale = self.scales[int(torch.randint(len(self.scales), (), generator=generator))]
            x, (scale_x, scale_y) = prepare_image(torch.tensor(image), target_size=scale,
                                                  max_size=self.max_size, pixel_mean=self.pixel_mean,
                                                  pixel_std=self.pixel_std, flip=flip)
            proposal_boxes = np.array(self.get_proposals(record.image_id), np.float32).reshape(-1, 4)
            height, width = image.shape[:2]
            proposal_boxes[:, 0::2] = proposal_boxes[:, 0::2].clip(0, width)
            proposal_boxes[:, 1::2] = proposal_boxes[:, 1::2].clip(0, height)
            proposal_boxes = proposal_boxes[_valid_boxes(proposal_boxes)]  # [P, 4], inside the image
            gt_boxes = np.asarray(record.gt_boxes, np.float32).reshape(-1, 4)
            keep = _valid_boxes(gt_boxes)
            if len(record.gt_difficult) == len(gt_boxes):
                keep &= ~np.asarray(record.gt_difficult, bool)
            gt_boxes, gt_classes = gt_boxes[keep], np.asarray(record.gt_classes, np.int64)[keep]
            if flip:
                proposal_boxes, gt_boxes = flip_boxes(proposal_boxes, width), flip_boxes(gt_boxes, width)
            roi_boxes, roi_labels, roi_targets = sample_rois(
                torch.from_numpy(proposal_boxes), torch.from_numpy(gt_boxes), torch.from_numpy(gt_classes),
                generator=generator, **self.sampling)
            scaled = roi_boxes * torch.tensor([scale_x, scale_y, scale_x, scale_y])  # [R_i, 4]
            rois.append(torch.cat([torch.full((len(scaled), 1), float(slot)), scaled], dim=1))
            images.append(x)
            labels.append(roi_labels)
            targets.append(roi_targets)
            image_ids.append(record.image_id)
        height = max(x.shape[1] for x in images)
        width = max(x.shape[2] for x in images)
        batch_images = images[0].new_zeros((len(images), 3, height, width))  # [N, 3, H, W]
        for i, x in enumerate(images):
            batch_images[i, :, : x.shape[1], : x.shape[2]] = x
        return TrainBatch(batch_images, torch.cat(rois), torch.cat(labels), torch.cat(targets),
                          image_ids, skipped)


class _Prefetcher:
    """Builds the batches of the coming iterations in background threads, handed out in order.

    Threads, not processes: image decoding and resizing release the GIL, and the proposal store
    need not be picklable. Asking for an unexpected iteration (a resume) restarts from there.
    """

    def __init__(self, data: FastRCNNTrainData, *, num_workers: int, max_iter: int):
        self.data, self.max_iter = data, max_iter
        self.depth = 2 * num_workers
        self.pool = ThreadPoolExecutor(num_workers, "frcn-data") if num_workers > 0 else None
        self.pending: dict[int, Future] = {}

    def get(self, iteration: int) -> TrainBatch:
        if self.pool is None:
            return self.data.batch(iteration)
        for it in range(iteration, min(iteration + self.depth, self.max_iter)):
            if it not in self.pending:
                self.pending[it] = self.pool.submit(self.data.batch, it)
        future = self.pending.pop(iteration, None) or self.pool.submit(self.data.batch, iteration)
        for stale in [it for it in self.pending if it < iteration]:
            self.pending.pop(stale).cancel()
        return future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# Wiring: build from a config, optimizer, train, reload
# ----------------------------------------------------------------------------------------------


def build_fast_rcnn(cfg: Config, class_names: list[str]) -> FastRCNN:
    """The one place a ``FastRCNN`` is made from a config."""
    m = cfg.model
    backbone = build_backbone(m.backbone, weights=m.weights, freeze_at=m.freeze_at, head_dim=m.head_dim,
                              dropout=m.dropout, roi_size=m.roi_size)
    model = FastRCNN(backbone=backbone, class_names=class_names, roi_op=m.roi_op,
                     bbox_std=tuple(cfg.train.bbox_std), test_scale=cfg.test.scale,
                     test_max_size=cfg.test.max_size, score_thresh=cfg.test.score_thresh,
                     nms_thresh=cfg.test.nms_thresh, detections_per_image=cfg.test.detections_per_image)
    model.backbone_name = m.backbone
    return model


def build_from_checkpoint(ckpt: dict) -> FastRCNN:
    """Rebuild a trained FastRCNN from a detector checkpoint dict (see ``detect.engine``).

    The config inside gives the architecture (built with weights "none", then the state dict
    is loaded strictly); ``test.svd`` applies truncated SVD after loading.
    """
    if ckpt.get("kind", "fast_rcnn") != "fast_rcnn":
        raise ValueError(f"a {ckpt['kind']!r} checkpoint, not a Fast R-CNN one (detect.inference.load_detector "
                         "reads either kind)")
    cfg = from_dict(ckpt["config"], "checkpoint config")
    cfg.model.weights = "none"
    model = build_fast_rcnn(cfg, list(ckpt["class_names"]))
    model.load_state_dict(ckpt["model"])
    if cfg.test.svd:
        model.apply_svd(cfg.test.svd_fc6, cfg.test.svd_fc7)
    return model.eval()


def build_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over the trainable parameters; [FRCN]: biases get 2x the lr and no weight decay.

    The groups carry ``lr_scale`` (read by ``engine.train_loop`` when it sets the lr).
    """
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": biases, "lr": 2 * lr, "weight_decay": 0.0, "lr_scale": 2.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum)


def train(cfg: Config, output_dir: Path, *, resume: bool, device: torch.device) -> Path:
    """Train Fast R-CNN as ``cfg`` says; returns the path of ``model_final.pt``."""
    from detect import engine
    output_dir = Path(output_dir)
    rank, world_size = engine.dist_info()
    t = cfg.train
    dataset, store = engine.load_train_split(cfg)
    engine.seed_everything(t.seed)
    model = build_fast_rcnn(cfg, dataset.class_names).to(device)
    data = FastRCNNTrainData(
        records=dataset.records, get_proposals=store.get, pixel_mean=model.pixel_mean,
        pixel_std=model.pixel_std, images_per_batch=t.images_per_batch, rois_per_image=t.rois_per_image,
        scales=t.scales, max_size=t.max_size, flip=t.flip, fg_fraction=t.fg_fraction, fg_iou=t.fg_iou,
        bg_iou_low=t.bg_iou_low, bg_iou_high=t.bg_iou_high, bbox_std=t.bbox_std, seed=t.seed,
        rank=rank, world_size=world_size)
    prefetcher = _Prefetcher(data, num_workers=t.num_workers, max_iter=t.max_iter)
    skipped: list[str] = []

    def step_fn(train_model: nn.Module, iteration: int) -> dict[str, Tensor]:
        batch = prefetcher.get(iteration)
        for reason in batch.skipped_files:
            warnings.warn(f"skipping unreadable training image {reason}", stacklevel=2)
        skipped.extend(batch.skipped_files)
        class_logits, box_deltas = train_model(batch.images.to(device, non_blocking=True),
                                               batch.rois.to(device))
        return fast_rcnn_loss(class_logits, box_deltas, batch.labels.to(device),
                              batch.box_targets.to(device), bbox_loss_weight=t.bbox_loss_weight)

    try:
        model = engine.train_loop(
            model=model, step_fn=step_fn,
            optimizer=build_optimizer(model, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay),
            lr_at=engine.step_lr(t.lr, t.steps, t.gamma, t.warmup_iters, t.warmup_factor),
            max_iter=t.max_iter, output_dir=output_dir, checkpoint_period=t.checkpoint_period,
            log_period=t.log_period, amp=t.amp, device=device, resume=resume,
            checkpoint_extra={"class_names": dataset.class_names}, desc="train fast_rcnn")
    finally:
        prefetcher.close()
    if skipped:
        print(f"skipped {len(skipped)} unreadable training images (listed in the warnings above)")
    path = output_dir / "model_final.pt"
    if rank == 0:
        engine.save_detector_checkpoint(path, kind="fast_rcnn", config=to_dict(cfg),
                                        class_names=dataset.class_names,
                                        category_ids=dataset.category_ids, state_dict=model.state_dict(),
                                        extra={"skipped_images": len(skipped)})
    engine.barrier()
    return path
