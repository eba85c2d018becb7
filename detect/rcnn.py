"""R-CNN ([RCNN] Girshick et al., CVPR 2014): warped regions -> CNN -> per-class SVMs + box ridge.

Shapes: R regions (proposals, and ground truth during training), B crops in a batch, K object
classes (background is not a column), C x S x S the pool5 map, D the fc7 width, D5 = C * S * S.

The network is the shared ``detect.backbones.Backbone`` applied to a warped crop
[B, 3, crop, crop]: pool5 = adaptive max pool of ``body(crop)`` to S x S (VGG16's pool5 at 224,
AlexNet's at 227), fc7 = ``head(pool5)``. Fast R-CNN uses the same backbone object, so the two
detectors differ only in how regions reach the head.

Training has four resumable stages, each a folder of ``output_dir`` finished by a ``done``
marker that records its settings (``train`` below): finetune/ (the CNN on warped regions),
features/ (fc7 and pool5 cached as float16, see ``detect.svm``), svm/ (per-class SVMs with
hard-negative mining), bbox_reg/ (per-class ridge regression on pool5); then model_final.pt.

Region warping (``warp_regions``) follows [RCNN] rcnn_im_crop.m "warp" mode with 16 pixels of
context: the box is dilated about its centre by crop / (crop - 2 * 16) and warped
anisotropically; image content outside the image is the mean. Difference from the MATLAB code:
it clipped the dilated box to the image, resized the in-image part and pasted it at a rounded
offset into a mean-filled crop; we sample the whole dilated box directly, so the geometry is the
same without the rounding to whole pixels.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from detect.backbones import Backbone, build_backbone
from detect.boxes import box_iou_numpy
from detect.data import ImageReadError, ImageRecord, read_image
from detect.detector import Detector, ProposalScores, StageTimer
from detect.io import atomic_path, read_json, write_json_atomic
from detect.svm import FEATURE_FORMAT, FEATURE_VERSION, FeatureCache, ImageRows, ShardWriter, shard_name

# ----------------------------------------------------------------------------------------------
# Warping
# ----------------------------------------------------------------------------------------------


def context_boxes(boxes: Tensor, *, crop_size: int, context_pad: int) -> Tensor:
    """Dilate boxes [R, 4] about their centres so that ``context_pad`` pixels of context remain on
    each side after warping to ``crop_size`` ([RCNN]: scale = crop / (crop - 2 p))."""
    if not 0 <= 2 * context_pad < crop_size:
        raise ValueError(f"context_pad {context_pad} must be >= 0 and below half of crop_size {crop_size}")
    scale = crop_size / (crop_size - 2 * context_pad)
    center = (boxes[:, :2] + boxes[:, 2:]) / 2  # [R, 2]
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * scale  # [R, 2]
    return torch.cat([center - half, center + half], dim=1)  # [R, 4]


def warp_regions(image: Tensor, boxes: Tensor, *, crop_size: int, context_pad: int = 16,
                 fill: Tensor | None = None) -> Tensor:
    """Warp regions of one image to squares: image [3, H, W] float, boxes [R, 4] xyxy ->
    [R, 3, crop_size, crop_size], batched on the image's device (one ``roi_align`` call).

    Each output pixel is the bilinear sample of the image at the matching point of the dilated
    box (see the module docstring), one sample per pixel as Caffe/OpenCV resizing does (no
    anti-aliasing). Whatever falls outside the image is exactly ``fill`` [3] (the image mean in
    the image's units; None = 0, right for a mean-subtracted image), including the half-pixel
    border where bilinear weights straddle the edge: the image is padded with one pixel of
    ``fill`` so those samples blend with it, as a mean-padded image would.
    """
    num_boxes = boxes.shape[0]
    if num_boxes == 0:
        return image.new_zeros((0, 3, crop_size, crop_size))
    fill = torch.zeros(3) if fill is None else fill
    fill = fill.to(device=image.device, dtype=image.dtype).view(3, 1, 1)
    padded = F.pad(image - fill, (1, 1, 1, 1))  # [3, H + 2, W + 2]; 0 outside = fill
    big = context_boxes(boxes.to(image.dtype), crop_size=crop_size, context_pad=context_pad) + 1.0
    rois = torch.cat([big.new_zeros((num_boxes, 1)), big], dim=1)  # [R, 5]; +1: the pad
    crops = roi_align(padded[None], rois, output_size=crop_size, spatial_scale=1.0, sampling_ratio=1,
                      aligned=True)  # [R, 3, crop, crop]
    return crops + fill


def normalize_image(image: np.ndarray, *, pixel_mean, pixel_std, device: torch.device) -> Tensor:
    """uint8 RGB [H, W, 3] -> normalised float [3, H, W] on ``device`` ((x / 255 - mean) / std)."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8, order="C")).to(device).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(pixel_mean, device=device).view(3, 1, 1)
    std = torch.tensor(pixel_std, device=device).view(3, 1, 1)
    return (x - mean) / std  # [3, H, W]


def _autocast(device: torch.device, enabled: bool):
    use = enabled and device.type == "cuda"
    dtype = torch.bfloat16 if use and torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=use)


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


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
    """pool5 [R, D5] (flattened) and fc7 [R, D] of regions of one normalised image, in batches."""
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, 0)), boxes.new_zeros((0, 0))
    pool5_out, fc7_out = [], []
    for start in range(0, boxes.shape[0], batch_size):
        crops = warp_regions(image, boxes[start:start + batch_size], crop_size=crop_size, context_pad=context_pad)
        with _autocast(image.device, amp):
            pool5, fc7 = net(crops)
        pool5_out.append(pool5.flatten(1).float())
        fc7_out.append(fc7.float())
    return torch.cat(pool5_out), torch.cat(fc7_out)


# ----------------------------------------------------------------------------------------------
# The detector
# ----------------------------------------------------------------------------------------------


class RCNN(Detector):
    """R-CNN at test time: warp each proposal, run the CNN, score with SVMs, regress boxes.

    ``svm_weight`` [K, D] and ``svm_bias`` [K] act on fc7 x ``feat_scale``; ``bbox_weight``
    [K, D5, 4] and ``bbox_bias`` [K, 4] act on raw flattened pool5 and give normalised deltas,
    de-normalised with ``bbox_target_mean`` / ``bbox_target_std`` [K, 4]. All are buffers, so
    ``.to(device)`` moves them; they are not in ``state_dict()`` (the checkpoint keeps them in
    ``extra``). ``max_proposals`` > 0 scores only the first that many proposals (selective
    search ranks them), bounding test time on CPU.
    """

    kind = "rcnn"

    def __init__(self, *, backbone: Backbone, class_names: list[str], crop_size: int, context_pad: int = 16,
                 svm_weight: Tensor, svm_bias: Tensor, feat_scale: float, bbox_weight: Tensor, bbox_bias: Tensor,
                 bbox_target_mean: Tensor, bbox_target_std: Tensor, test_chunk: int = 512, max_proposals: int = 0,
                 score_thresh: float = 0.05, nms_thresh: float = 0.3, detections_per_image: int = 100):
        super().__init__(class_names=class_names, score_thresh=score_thresh, nms_thresh=nms_thresh,
                         detections_per_image=detections_per_image)
        k, d = len(class_names), backbone.head_dim
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
        self.pixel_mean, self.pixel_std = tuple(backbone.pixel_mean), tuple(backbone.pixel_std)
        self.crop_size, self.context_pad = crop_size, context_pad
        self.feat_scale = float(feat_scale)
        self.test_chunk, self.max_proposals = test_chunk, max_proposals
        self.amp = True
        self.backbone_name = ""

    @torch.no_grad()
    def score_proposals(self, image: np.ndarray, proposal_boxes: Tensor,
                        timer: StageTimer | None = None) -> ProposalScores:
        """Scores [R, K] and deltas [R, K, 4] (un-normalised) of proposals [R, 4] of a uint8 image.

        Scores are the SVM margins squashed by a sigmoid: monotone, so AP is unchanged, and a
        score threshold means roughly what it means for Fast R-CNN's probabilities (margin 0 is
        0.5). Proposals go through in chunks of ``test_chunk`` (bounded memory); timer stages:
        warp, features, svm, bbox_reg.
        """
        timer = timer or StageTimer(self.device)
        device = self.device
        if self.max_proposals > 0:
            proposal_boxes = proposal_boxes[: self.max_proposals]
        proposal_boxes = proposal_boxes.to(device=device, dtype=torch.float32)
        num_classes = self.num_classes
        if proposal_boxes.shape[0] == 0:
            return ProposalScores(proposal_boxes, proposal_boxes.new_zeros((0, num_classes)),
                                  proposal_boxes.new_zeros((0, num_classes, 4)))
        with timer("warp"):
            image_t = normalize_image(image, pixel_mean=self.pixel_mean, pixel_std=self.pixel_std, device=device)
        bbox_weight = self.bbox_weight.permute(1, 0, 2).reshape(self.bbox_weight.shape[1], -1)  # [D5, K * 4]
        scores, deltas = [], []
        for start in range(0, proposal_boxes.shape[0], self.test_chunk):
            boxes = proposal_boxes[start:start + self.test_chunk]
            with timer("warp"):
                crops = warp_regions(image_t, boxes, crop_size=self.crop_size, context_pad=self.context_pad)
            with timer("features"), _autocast(device, self.amp):
                pool5, fc7 = self.net(crops)
            with timer("svm"):
                margin = (fc7.float() * self.feat_scale) @ self.svm_weight.T + self.svm_bias  # [r, K]
                scores.append(torch.sigmoid(margin))
            with timer("bbox_reg"):
                d = (pool5.flatten(1).float() @ bbox_weight).view(-1, num_classes, 4) + self.bbox_bias  # [r, K, 4]
                deltas.append(d * self.bbox_target_std + self.bbox_target_mean)
        return ProposalScores(proposal_boxes, torch.cat(scores), torch.cat(deltas))


def build_rcnn(cfg, class_names: list[str], extra: dict) -> RCNN:
    """Wire an ``RCNN`` from a ``Config`` and the trained tensors in ``extra`` (see ``train``);
    the backbone starts random (weights "none"): load the trained state dict next."""
    backbone = build_backbone(cfg.model.backbone, weights="none", freeze_at="", head_dim=cfg.model.head_dim,
                              dropout=cfg.model.dropout, roi_size=cfg.model.roi_size)
    model = RCNN(backbone=backbone, class_names=class_names, crop_size=cfg.rcnn.crop_size or backbone.crop_size,
                 context_pad=cfg.rcnn.context_pad, svm_weight=extra["svm_weight"], svm_bias=extra["svm_bias"],
                 feat_scale=float(extra["feat_scale"]), bbox_weight=extra["bbox_weight"],
                 bbox_bias=extra["bbox_bias"], bbox_target_mean=extra["bbox_target_mean"],
                 bbox_target_std=extra["bbox_target_std"], test_chunk=cfg.rcnn.test_chunk,
                 max_proposals=cfg.proposals.top_k, score_thresh=cfg.test.score_thresh,
                 nms_thresh=cfg.test.nms_thresh, detections_per_image=cfg.test.detections_per_image)
    model.amp = cfg.train.amp
    model.backbone_name = cfg.model.backbone
    return model


def build_from_checkpoint(ckpt: dict) -> RCNN:
    """Rebuild a trained R-CNN from a detector checkpoint dict (``engine.load_checkpoint``)."""
    from detect.config import from_dict

    if ckpt.get("kind", "rcnn") != "rcnn":
        raise ValueError(f"a {ckpt['kind']!r} checkpoint, not an R-CNN one (detect.inference.load_detector "
                         "reads either kind)")
    cfg = from_dict(ckpt["config"], "checkpoint config")
    model = build_rcnn(cfg, ckpt["class_names"], ckpt["extra"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Regions of a training image
# ----------------------------------------------------------------------------------------------


def image_rows(record: ImageRecord, proposals: np.ndarray, *, num_classes: int, bbox_min_iou: float) -> ImageRows:
    """The rows of one training image: its non-difficult gt boxes first, then its proposals.

    Overlaps per class use every gt box (a proposal on a difficult object is no negative);
    best IoU / class / box use the non-difficult ones (what a row may be trained to become).
    """
    gt_boxes = np.asarray(record.gt_boxes, np.float32).reshape(-1, 4)
    gt_classes = np.asarray(record.gt_classes, np.int64).reshape(-1)
    difficult = np.asarray(record.gt_difficult, bool).reshape(-1)
    if difficult.shape != gt_classes.shape:
        difficult = np.zeros(gt_classes.shape, bool)
    easy = ~difficult
    proposals = np.asarray(proposals, np.float32).reshape(-1, 4)
    boxes = np.concatenate([gt_boxes[easy], proposals])  # [R, 4]
    num_rows = len(boxes)
    iou = box_iou_numpy(boxes, gt_boxes)  # [R, G]
    overlaps = np.zeros((num_rows, num_classes), np.float32)
    for k in np.unique(gt_classes).tolist():
        overlaps[:, k - 1] = iou[:, gt_classes == k].max(axis=1)
    best_iou = np.zeros(num_rows, np.float32)
    best_classes = np.zeros(num_rows, np.int16)
    best_gt_boxes = np.zeros((num_rows, 4), np.float32)
    if easy.any():
        easy_iou = iou[:, easy]
        arg = easy_iou.argmax(axis=1)
        best_iou = easy_iou[np.arange(num_rows), arg]
        best_classes = gt_classes[easy][arg].astype(np.int16)
        best_gt_boxes = gt_boxes[easy][arg]
    row_gt = np.concatenate([gt_classes[easy], np.zeros(len(proposals), np.int64)]).astype(np.int16)
    return ImageRows(image_id=int(record.image_id), boxes=boxes, gt_classes=row_gt, overlaps=overlaps,
                     best_iou=best_iou.astype(np.float32), best_classes=best_classes, best_gt_boxes=best_gt_boxes,
                     has_pool5=best_iou >= bbox_min_iou)


# ----------------------------------------------------------------------------------------------
# Stage 1: fine-tuning batches
# ----------------------------------------------------------------------------------------------


class FineTuneSampler:
    """Fine-tuning mini-batches ([RCNN] code: Caffe WindowDataLayer), built from (seed, iteration).

    Each batch has ``batch_size`` warped windows, ``fg_per_batch`` of them foreground (IoU >=
    ``fg_iou`` with a gt box, labelled with its class; the gt boxes are windows too) and the rest
    background (label 0; [RCNN] fine-tuning calls every other proposal background). The original
    drew windows uniformly from the whole dataset; we draw ``images_per_batch`` images per batch
    (uniformly, without replacement) and sample the windows among theirs, with replacement only
    when an image set has too few. Windows are mirrored with probability 0.5 (``flip``). The
    batch depends only on (seed, iteration), so a resumed run sees the same batches. Under DDP,
    rank r takes its own ``images_per_batch`` images of each global batch.
    """

    def __init__(self, *, records: list[ImageRecord], get_proposals: Callable[[int], np.ndarray],
                 num_classes: int, crop_size: int, context_pad: int, pixel_mean, pixel_std,
                 device: torch.device, batch_size: int = 128, fg_per_batch: int = 32, fg_iou: float = 0.5,
                 images_per_batch: int = 4, flip: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not records:
            raise ValueError("fine-tuning needs at least one training image")
        if not 0 <= fg_per_batch <= batch_size:
            raise ValueError(f"fg_per_batch {fg_per_batch} must be in [0, batch_size {batch_size}]")
        self.records, self.get_proposals = records, get_proposals
        self.num_classes, self.crop_size, self.context_pad = num_classes, crop_size, context_pad
        self.pixel_mean, self.pixel_std, self.device = pixel_mean, pixel_std, device
        self.batch_size, self.fg_per_batch, self.fg_iou = batch_size, fg_per_batch, fg_iou
        self.images_per_batch, self.flip, self.seed = images_per_batch, flip, seed
        self.rank, self.world_size = rank, world_size
        self.unreadable: dict[str, str] = {}

    def batch(self, iteration: int) -> tuple[Tensor, Tensor]:
        """crops [B, 3, crop, crop] (normalised, on the device) and labels [B] (0 = background)."""
        rng = np.random.default_rng([self.seed, iteration])
        per_rank = min(self.images_per_batch, max(len(self.records) // self.world_size, 1))
        order = rng.permutation(len(self.records))[: per_rank * self.world_size]
        chosen = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        images, windows = [], []
        for i in chosen.tolist():
            record = self.records[i]
            try:
                images.append(read_image(record.file_name))
            except ImageReadError as e:
                if record.file_name not in self.unreadable:
                    self.unreadable[record.file_name] = e.reason
                    warnings.warn(f"fine-tuning skips an unreadable image ({len(self.unreadable)} so far): {e}")
                continue
            rows = image_rows(record, self.get_proposals(record.image_id), num_classes=self.num_classes,
                              bbox_min_iou=1.0)
            labels = np.where(rows.best_iou >= self.fg_iou, rows.best_classes, 0).astype(np.int64)
            windows.append((rows.boxes, labels))
        all_boxes = np.concatenate([w[0] for w in windows] or [np.zeros((0, 4), np.float32)])  # [N, 4]
        labels = np.concatenate([w[1] for w in windows] or [np.zeros(0, np.int64)])  # [N]
        slot = np.concatenate([np.full(len(w[1]), j) for j, w in enumerate(windows)] or [np.zeros(0, np.int64)])
        fg, bg = np.flatnonzero(labels > 0), np.flatnonzero(labels == 0)
        num_fg = self.fg_per_batch if fg.size else 0
        num_bg = self.batch_size - num_fg if bg.size else 0
        pick = np.concatenate([rng.choice(fg, num_fg, replace=fg.size < num_fg),
                               rng.choice(bg, num_bg, replace=bg.size < num_bg)]).astype(np.int64)
        pick = pick[np.argsort(slot[pick], kind="stable")]  # grouped by image: one warp call each
        crops = [torch.zeros((0, 3, self.crop_size, self.crop_size), device=self.device)]
        for j, image in enumerate(images):
            mine = pick[slot[pick] == j]
            if mine.size:
                image_t = normalize_image(image, pixel_mean=self.pixel_mean, pixel_std=self.pixel_std,
                                          device=self.device)
                boxes = torch.from_numpy(all_boxes[mine]).to(self.device)
                crops.append(warp_regions(image_t, boxes, crop_size=self.crop_size, context_pad=self.context_pad))
        crops_t = torch.cat(crops)  # [B, 3, crop, crop]
        if self.flip:
            mirror = torch.from_numpy(rng.random(pick.size) < 0.5).to(self.device)
            crops_t = torch.where(mirror.view(-1, 1, 1, 1), crops_t.flip(-1), crops_t)
        return crops_t, torch.from_numpy(labels[pick]).to(self.device)


def finetune_param_groups(model: FineTuneNet, *, weight_decay: float) -> list[dict]:
    """SGD groups as the [RCNN] fine-tuning prototxt: biases at 2x lr without weight decay, the
    new classifier at 10x lr (its bias 20x). ``lr_scale`` is applied by ``engine.train_loop``."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 10.0 if name.startswith("cls_score.") else 1.0
        is_bias = name.endswith("bias")
        key = (scale * (2.0 if is_bias else 1.0), 0.0 if is_bias else weight_decay)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr_scale": s, "weight_decay": wd} for (s, wd), ps in groups.items()]


# ----------------------------------------------------------------------------------------------
# Stage 2: features (cached to disk, or streamed)
# ----------------------------------------------------------------------------------------------


class _RegionFeaturizer:
    """Reads a training image once and computes pool5/fc7 of any of its rows (eval mode)."""

    def __init__(self, net: RegionNet, *, records: list[ImageRecord], get_proposals: Callable[[int], np.ndarray],
                 num_classes: int, crop_size: int, context_pad: int, pixel_mean, pixel_std, bbox_min_iou: float,
                 batch_size: int, amp: bool):
        self.net, self.records, self.get_proposals = net, records, get_proposals
        self.num_classes, self.bbox_min_iou = num_classes, bbox_min_iou
        self.crop_size, self.context_pad = crop_size, context_pad
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        self.batch_size, self.amp = batch_size, amp
        self.device = next(net.parameters()).device
        self.unreadable: dict[str, str] = {}
        self._cached: tuple[int, ImageRows, Tensor | None] | None = None

    def load(self, i: int) -> tuple[ImageRows, Tensor | None]:
        """Rows of image i and its normalised image tensor (None, with no rows, if unreadable)."""
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1], self._cached[2]
        record = self.records[i]
        try:
            image_t = normalize_image(read_image(record.file_name), pixel_mean=self.pixel_mean,
                                      pixel_std=self.pixel_std, device=self.device)
            proposals = self.get_proposals(record.image_id)
        except ImageReadError as e:
            if record.file_name not in self.unreadable:
                warnings.warn(f"R-CNN features: skipping an unreadable image: {e}")
            self.unreadable[record.file_name] = e.reason
            image_t, proposals = None, np.zeros((0, 4), np.float32)
            record = ImageRecord(record.image_id, record.file_name, record.width, record.height)
        rows = image_rows(record, proposals, num_classes=self.num_classes, bbox_min_iou=self.bbox_min_iou)
        self._cached = (i, rows, image_t)
        return rows, image_t

    @torch.no_grad()
    def features(self, i: int, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        """pool5 [n, D5] and fc7 [n, D] (float32, on the device) of rows ``rows`` of image i."""
        info, image_t = self.load(i)
        boxes = torch.from_numpy(info.boxes[np.asarray(rows, np.int64)]).to(self.device)
        return region_features(self.net, image_t, boxes, crop_size=self.crop_size, context_pad=self.context_pad,
                               batch_size=self.batch_size, amp=self.amp)


class StreamingFeatures:
    """A ``detect.svm.FeatureSource`` that recomputes features when asked (``cache_features:
    false``): no disk, but every SVM / regression pass runs the network again."""

    def __init__(self, featurizer: _RegionFeaturizer, *, fc7_dim: int, pool5_dim: int):
        self.featurizer = featurizer
        self.num_images = len(featurizer.records)
        self.fc7_dim, self.pool5_dim = fc7_dim, pool5_dim

    def rows(self, i: int) -> ImageRows:
        return self.featurizer.load(i)[0]

    def fc7(self, i: int, rows: np.ndarray) -> np.ndarray:
        return self.featurizer.features(i, rows)[1].cpu().numpy().reshape(-1, self.fc7_dim)

    def pool5(self, i: int, rows: np.ndarray) -> np.ndarray:
        return self.featurizer.features(i, rows)[0].cpu().numpy().reshape(-1, self.pool5_dim)


def extract_features(featurizer: _RegionFeaturizer, cache_dir: str | Path, *, fc7_dim: int, pool5_dim: int,
                     images_per_shard: int = 64, rank: int = 0, world_size: int = 1,
                     progress: bool = True) -> bool:
    """Cache fc7 of every row and pool5 of rows with IoU >= bbox_min_iou (format: ``detect.svm``).

    Shard k holds images [k * images_per_shard, (k + 1) * images_per_shard); rank r writes the
    shards with k % world_size == r; existing shards are skipped (resume). Returns True when every
    shard of the cache exists (the caller then writes the stage's ``done`` marker).
    """
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    records = featurizer.records
    num_shards = (len(records) + images_per_shard - 1) // images_per_shard
    meta = {"format": FEATURE_FORMAT, "version": FEATURE_VERSION, "num_images": len(records),
            "images_per_shard": images_per_shard, "num_shards": num_shards, "fc7_dim": fc7_dim,
            "pool5_dim": pool5_dim, "num_classes": featurizer.num_classes, "bbox_min_iou": featurizer.bbox_min_iou,
            "image_ids": [int(r.image_id) for r in records]}
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        if read_json(meta_path) != meta:
            raise ValueError(f"{meta_path}: a feature cache of another dataset or network is here; delete "
                             f"{cache_dir} or use another --output-dir")
    else:
        write_json_atomic(meta_path, meta)
    mine = [k for k in range(num_shards) if k % world_size == rank and not (cache_dir / shard_name(k)).is_dir()]
    featurizer.net.eval()
    bar = tqdm(total=sum(len(records[k * images_per_shard:(k + 1) * images_per_shard]) for k in mine),
               desc="features", unit="img", disable=not progress, dynamic_ncols=True)
    for k in mine:
        writer = ShardWriter(cache_dir, k, fc7_dim=fc7_dim, pool5_dim=pool5_dim)
        for i in range(k * images_per_shard, min((k + 1) * images_per_shard, len(records))):
            rows, _ = featurizer.load(i)
            pool5, fc7 = featurizer.features(i, np.arange(len(rows)))
            pool5 = pool5[torch.from_numpy(rows.has_pool5).to(pool5.device)] if len(rows) else pool5
            writer.add(rows, fc7.cpu().numpy().reshape(-1, fc7_dim), pool5.cpu().numpy().reshape(-1, pool5_dim))
            bar.update(1)
        writer.close()
    bar.close()
    return all((cache_dir / shard_name(k)).is_dir() for k in range(num_shards))


# ----------------------------------------------------------------------------------------------
# Training: the four stages
# ----------------------------------------------------------------------------------------------


def _stage_done(stage_dir: Path, settings: dict) -> bool:
    """True if ``stage_dir`` finished with ``settings``; an error if it finished with others."""
    marker = stage_dir / "done"
    if not marker.is_file():
        return False
    if read_json(marker).get("settings") != json.loads(json.dumps(settings)):
        raise ValueError(f"{stage_dir}: finished with other settings than this config's; delete it (and the "
                         f"stages after it) to redo it with these, or use another --output-dir")
    return True


def _mark_done(stage_dir: Path, settings: dict, seconds: float, **info) -> None:
    write_json_atomic(stage_dir / "done", {"settings": settings, "seconds": round(seconds, 3), **info})


def _save_arrays(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def train(cfg, output_dir: str | Path, *, resume: bool = False, device: torch.device = torch.device("cpu"),
          progress: bool = True) -> Path:
    """Train R-CNN's four stages in order ([RCNN]) and write ``output_dir/model_final.pt``.

    A stage whose folder has a ``done`` marker with the same settings is skipped, so ``resume``
    continues an interrupted run where it stopped (fine-tuning from its last checkpoint, features
    from the last finished shard, SVMs from the last finished class). Without ``resume`` an
    output folder that already holds stages is an error, as for ``engine.train_loop``. The SVMs
    train in spawned processes: a script calling this needs the ``if __name__ == "__main__":``
    guard (``detect train`` has it).
    """
    from detect import engine
    from detect.config import to_dict
    from detect.svm import feature_cache_bytes, mean_feature_norm, train_box_regressors, train_svms

    output_dir = Path(output_dir)
    stage_dirs = {name: output_dir / name for name in ("finetune", "features", "svm", "bbox_reg")}
    if not resume and any(d.exists() for d in stage_dirs.values()):
        raise ValueError(f"{output_dir}: holds R-CNN stages already; pass --resume to continue (finished stages "
                         f"are skipped), or choose another --output-dir")
    rank, world = engine.dist_info()
    idle_group = engine.long_wait_group()  # other ranks wait in it while rank 0 trains the SVMs
    r, m = cfg.rcnn, cfg.model
    dataset, store = engine.load_train_split(cfg)
    top_k = cfg.proposals.top_k

    def get_proposals(image_id: int) -> np.ndarray:
        boxes = store.get(image_id)
        return boxes[:top_k] if top_k > 0 else boxes

    backbone = build_backbone(m.backbone, weights=m.weights, freeze_at=m.freeze_at, head_dim=m.head_dim,
                              dropout=m.dropout, roi_size=m.roi_size)
    crop_size, num_classes = r.crop_size or backbone.crop_size, dataset.num_classes
    fc7_dim, pool5_dim = backbone.head_dim, backbone.out_channels * backbone.roi_size ** 2
    net = RegionNet(body=backbone.body, head=backbone.head, roi_size=backbone.roi_size)
    warp = dict(crop_size=crop_size, context_pad=r.context_pad, pixel_mean=backbone.pixel_mean,
                pixel_std=backbone.pixel_std)
    times: dict[str, float] = {}

    # 1. Fine-tune the CNN on warped regions.
    ft_dir = stage_dirs["finetune"]
    ft_settings = {"data": {**to_dict(cfg.data.train), "proposals": cfg.data.train_proposals, "top_k": top_k,
                            "num_images": len(dataset)},
                   "model": to_dict(m), "crop_size": crop_size, "context_pad": r.context_pad, "seed": cfg.train.seed,
                   "flip": cfg.train.flip, **{k: v for k, v in to_dict(r).items() if k.startswith("ft_")}}
    if not _stage_done(ft_dir, ft_settings):
        t0 = time.perf_counter()
        model = FineTuneNet(net=net, head_dim=fc7_dim, num_classes=num_classes)
        sampler = FineTuneSampler(records=dataset.records, get_proposals=get_proposals, num_classes=num_classes,
                                  device=device, batch_size=r.ft_batch_size, fg_per_batch=r.ft_fg_per_batch,
                                  fg_iou=r.ft_fg_iou, flip=cfg.train.flip, seed=cfg.train.seed, rank=rank,
                                  world_size=world, **warp)

        def step_fn(train_model: nn.Module, iteration: int) -> dict[str, Tensor]:
            crops, labels = sampler.batch(iteration)
            if labels.numel() == 0:  # no readable image with a region: a zero loss keeps the loop simple
                # (through train_model, on the empty batch: under DDP every rank must join the all-reduce)
                return {"loss_cls": train_model(crops).sum() * 0.0}
            return {"loss_cls": F.cross_entropy(train_model(crops).float(), labels)}

        optimizer = torch.optim.SGD(finetune_param_groups(model, weight_decay=r.ft_weight_decay), lr=r.ft_lr,
                                    momentum=r.ft_momentum)
        engine.train_loop(model=model, step_fn=step_fn, optimizer=optimizer,
                          lr_at=engine.step_lr(r.ft_lr, r.ft_steps, cfg.train.gamma, cfg.train.warmup_iters,
                                               cfg.train.warmup_factor),
                          max_iter=r.ft_max_iter, output_dir=ft_dir, checkpoint_period=cfg.train.checkpoint_period,
                          log_period=cfg.train.log_period, amp=cfg.train.amp, device=device,
                          checkpoint_extra={"stage": "rcnn_finetune"}, resume=resume, desc="R-CNN fine-tune")
        if rank == 0:
            engine.save_checkpoint(ft_dir / "net.pt", {k: v.detach().cpu() for k, v in net.state_dict().items()})
            _mark_done(ft_dir, ft_settings, time.perf_counter() - t0, unreadable_images=sampler.unreadable)
        engine.barrier()
    net.load_state_dict(torch.load(ft_dir / "net.pt", map_location="cpu", weights_only=True))
    net.to(device).eval()
    featurizer = _RegionFeaturizer(net, records=dataset.records, get_proposals=get_proposals, num_classes=num_classes,
                                   bbox_min_iou=r.bbox_min_iou, batch_size=r.feature_batch_size, amp=cfg.train.amp,
                                   **warp)

    # 2. Features: cached as float16 shards (all ranks), or streamed.
    feat_dir = stage_dirs["features"]
    feat_settings = {"upstream": ft_settings, "cache_features": r.cache_features, "bbox_min_iou": r.bbox_min_iou}
    if r.cache_features:
        if not _stage_done(feat_dir, feat_settings):
            t0 = time.perf_counter()
            extract_features(featurizer, feat_dir, fc7_dim=fc7_dim, pool5_dim=pool5_dim, rank=rank,
                             world_size=world, progress=progress)
            engine.barrier()  # every rank has written its shards
            if rank == 0:
                _mark_done(feat_dir, feat_settings, time.perf_counter() - t0, bytes=feature_cache_bytes(feat_dir),
                           unreadable_images=featurizer.unreadable)
            engine.barrier()
        source = FeatureCache(feat_dir)
    else:
        source = StreamingFeatures(featurizer, fc7_dim=fc7_dim, pool5_dim=pool5_dim)
    final = output_dir / "model_final.pt"
    if rank != 0:  # the SVMs and regressors are cheap next to the CNN: rank 0 alone trains them
        engine.barrier(idle_group)  # a 7-day timeout: the SVMs may take longer than NCCL's 10 minutes
        return final

    # 3. One linear SVM per class on fc7, with hard-negative mining.
    svm_dir = stage_dirs["svm"]
    svm_options = dict(C=r.svm_C, pos_weight=r.svm_pos_weight, intercept_scaling=r.svm_intercept_scaling,
                       neg_iou=r.svm_neg_iou, hard_thresh=r.svm_hard_thresh, evict_thresh=r.svm_evict_thresh,
                       retrain_limit=r.svm_retrain_limit, passes=r.svm_passes)
    svm_settings = {"upstream": feat_settings, "feat_norm": r.svm_feat_norm, **svm_options}
    if not _stage_done(svm_dir, svm_settings):
        t0 = time.perf_counter()
        feat_scale = r.svm_feat_norm / mean_feature_norm(source, "fc7")
        weight, bias, stats = train_svms(source, svm_dir, num_classes=num_classes, workers=r.svm_workers,
                                         feat_scale=feat_scale, progress=progress, **svm_options)
        _save_arrays(svm_dir / "svm.npz", weight=weight, bias=bias, feat_scale=np.float64(feat_scale))
        _mark_done(svm_dir, svm_settings, time.perf_counter() - t0, classes=stats)
    svm = _load_arrays(svm_dir / "svm.npz")

    # 4. Per-class ridge regression from pool5 to box deltas.
    bbox_dir = stage_dirs["bbox_reg"]
    bbox_settings = {"upstream": feat_settings, "feat_norm": r.svm_feat_norm, "lambda": r.bbox_ridge_lambda,
                     "min_iou": r.bbox_min_iou}
    if not _stage_done(bbox_dir, bbox_settings):
        t0 = time.perf_counter()
        pool5_scale = r.svm_feat_norm / mean_feature_norm(source, "pool5")
        reg = train_box_regressors(source, num_classes=num_classes, feat_scale=pool5_scale, lam=r.bbox_ridge_lambda,
                                   min_iou=r.bbox_min_iou, progress=progress)
        bbox_dir.mkdir(parents=True, exist_ok=True)
        _save_arrays(bbox_dir / "bbox_reg.npz", weight=reg.weight, bias=reg.bias, target_mean=reg.target_mean,
                     target_std=reg.target_std, pool5_scale=np.float64(pool5_scale))
        _mark_done(bbox_dir, bbox_settings, time.perf_counter() - t0, classes=reg.stats)
    reg = _load_arrays(bbox_dir / "bbox_reg.npz")

    extra = {"svm_weight": svm["weight"], "svm_bias": svm["bias"], "feat_scale": svm["feat_scale"],
             "bbox_weight": reg["weight"], "bbox_bias": reg["bias"], "bbox_target_mean": reg["target_mean"],
             "bbox_target_std": reg["target_std"]}
    extra = {k: torch.from_numpy(np.asarray(v)) for k, v in extra.items()}
    detector = RCNN(backbone=backbone, class_names=dataset.class_names, crop_size=crop_size,
                    context_pad=r.context_pad, svm_weight=extra["svm_weight"], svm_bias=extra["svm_bias"],
                    feat_scale=float(extra["feat_scale"]), bbox_weight=extra["bbox_weight"],
                    bbox_bias=extra["bbox_bias"], bbox_target_mean=extra["bbox_target_mean"],
                    bbox_target_std=extra["bbox_target_std"])
    engine.save_detector_checkpoint(final, kind="rcnn", config=to_dict(cfg), class_names=dataset.class_names,
                                    category_ids=dataset.category_ids, state_dict=detector.state_dict(), extra=extra)
    for name, d in stage_dirs.items():
        if (d / "done").is_file():
            times[name] = read_json(d / "done")["seconds"]
    write_json_atomic(output_dir / "rcnn_stages.json", {"seconds": times})
    engine.barrier(idle_group)
    return final
