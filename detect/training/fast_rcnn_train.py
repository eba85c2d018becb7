"""Fast R-CNN training ([FRCN] section 2.3): RoI sampling, the multi-task loss, mini-batches.

Hierarchical sampling (``lib/roi_data_layer/minibatch.py``, ``FastRCNNTrainData``): N images
per mini-batch, then R / N RoIs per image. Shapes as in ``detect.models.fast_rcnn``.
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
from torchvision.ops import box_iou

from detect.common.box_ops import flip_boxes
from detect.common.boxes import encode_boxes
from detect.data.datasets import ImageRecord, training_gt
from detect.data.images import ImageReadError, read_image
from detect.models.fast_rcnn import FastRCNN, prepare_image
from detect.training.engine import train_loop


def sample_rois(proposal_boxes: Tensor, gt_boxes: Tensor, gt_classes: Tensor, *, num_rois: int = 64,
                fg_fraction: float = 0.25, fg_iou: float = 0.5, bg_iou_low: float = 0.1,
                bg_iou_high: float = 0.5, bbox_std: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
                generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """[FRCN] ``_sample_rois``: up to ``num_rois`` RoIs of one image, ``fg_fraction`` foreground.

    ``proposal_boxes`` [P, 4] and the trained-on ``gt_boxes`` [G, 4] (xyxy), which join the
    candidates, ``gt_classes`` [G] in 1..K. Foreground: IoU >= ``fg_iou``; background: max IoU in
    [``bg_iou_low``, ``bg_iou_high``), topped up with lower IoU when too few (unlike [FRCN]).
    Returns ``roi_boxes`` [R, 4], ``labels`` [R] (foreground first) and ``box_targets`` [R, 4]
    (deltas to the matched gt / ``bbox_std``; zeros for background).
    """
    device = proposal_boxes.device
    gt_boxes = gt_boxes.to(device, torch.float32)
    boxes = torch.cat([gt_boxes, proposal_boxes.float()])  # [G + P, 4]
    gt_classes = gt_classes.to(device, torch.int64)
    iou = torch.cat([box_iou(boxes, gt_boxes), boxes.new_zeros((len(boxes), 1))], dim=1)  # [G + P, G + 1]
    max_iou, matched_gt = iou.max(dim=1)  # [G + P]; the null last column: max IoU 0 without gt

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
    labels = torch.zeros(keep.numel(), dtype=torch.int64, device=device)  # [R]
    labels[: fg.numel()] = gt_classes[matched_gt[fg]]
    box_targets = boxes.new_zeros((keep.numel(), 4))  # [R, 4]
    box_targets[: fg.numel()] = encode_boxes(boxes[fg], gt_boxes[matched_gt[fg]], tuple(1.0 / s for s in bbox_std))
    return boxes[keep], labels, box_targets


def fast_rcnn_loss(class_logits: Tensor, box_deltas: Tensor, labels: Tensor, box_targets: Tensor, *,
                   bbox_loss_weight: float = 1.0) -> dict[str, Tensor]:
    """[FRCN] eq. 1: log loss over all RoIs + lambda * smooth-L1 (beta = 1) on foreground RoIs.

    ``class_logits`` [R, K+1], ``box_deltas`` [R, K, 4] and ``box_targets`` [R, 4] (normalised
    by bbox_std), ``labels`` [R] in 0..K. The box loss is summed and divided by R (as [FRCN]'s
    SmoothL1Loss layer); R = 0 gives zero losses that still carry gradients.
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
    return np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


class FastRCNNTrainData:
    """Builds the mini-batch of any iteration deterministically from (seed, iteration).

    Image order: the per-epoch permutations of ``records`` (seeded with (seed, epoch)), batch i
    taking the next ``images_per_batch * world_size`` positions, rank r its own share; scale,
    flip and RoI sampling are seeded with (seed, iteration, image slot). An unreadable image is
    passed over and named once in ``TrainBatch.skipped_files``. Trained-on gt: ``training_gt``'s,
    minus degenerate boxes. ``get_proposals(image_id)``: [P, 4] xyxy, original pixels.
    """

    def __init__(self, *, records: list[ImageRecord], get_proposals: Callable[[int], np.ndarray],
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], images_per_batch: int = 2,
                 rois_per_image: int = 64, scales: Sequence[int] = (600,), max_size: int = 1000,
                 flip: bool = True, fg_fraction: float = 0.25, fg_iou: float = 0.5,
                 bg_iou_low: float = 0.1, bg_iou_high: float = 0.5,
                 bbox_std: Sequence[float] = (0.1, 0.1, 0.2, 0.2), seed: int = 0, rank: int = 0,
                 world_size: int = 1, use_difficult: bool = True):
        if not records:
            raise ValueError("no training images")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if images_per_batch <= 0 or rois_per_image <= 0 or not scales:
            raise ValueError("images_per_batch and rois_per_image must be positive and scales non-empty")
        self.records = list(records)
        self.get_proposals = get_proposals
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.images_per_batch = images_per_batch
        self.scales, self.max_size, self.flip = list(scales), max_size, flip
        self.sampling = dict(num_rois=rois_per_image, fg_fraction=fg_fraction, fg_iou=fg_iou,
                             bg_iou_low=bg_iou_low, bg_iou_high=bg_iou_high, bbox_std=tuple(bbox_std))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.use_difficult = use_difficult
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
            proposal_boxes = proposal_boxes.clip(0, np.float32([width, height, width, height]))
            proposal_boxes = proposal_boxes[_valid_boxes(proposal_boxes)]  # [P, 4], inside the image
            gt_boxes = np.asarray(record.gt_boxes, np.float32).reshape(-1, 4)
            keep = _valid_boxes(gt_boxes) & training_gt(record, self.use_difficult)
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
        height, width = max(x.shape[1] for x in images), max(x.shape[2] for x in images)
        padded = [F.pad(x, (0, width - x.shape[2], 0, height - x.shape[1])) for x in images]  # [3, H, W] each
        return TrainBatch(torch.stack(padded), torch.cat(rois), torch.cat(labels), torch.cat(targets),
                          image_ids, skipped)


def build_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float,
                    lr_scale_of: Callable[[str], float] = lambda name: 1.0) -> torch.optim.SGD:
    """SGD over the trainable parameters, biases at 2x the lr without weight decay ([FRCN], [RCNN]),
    times ``lr_scale_of(name)``; groups by increasing ``lr_scale``, which ``engine.train_loop`` reads."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_bias = name.endswith(".bias")
            key = (lr_scale_of(name) * (2.0 if is_bias else 1.0), 0.0 if is_bias else weight_decay)
            groups.setdefault(key, []).append(p)
    return torch.optim.SGD([{"params": ps, "lr": s * lr, "weight_decay": wd, "lr_scale": s}
                            for (s, wd), ps in sorted(groups.items())], lr=lr, momentum=momentum)


def train_fast_rcnn(model: FastRCNN, data: FastRCNNTrainData, output_dir: str | Path, *,
                    optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float], max_iter: int,
                    checkpoint_period: int, log_period: int = 20, amp: bool = True,
                    bbox_loss_weight: float = 1.0, num_workers: int = 2,
                    device: torch.device = torch.device("cpu"), resume: bool = False,
                    eval_fn: Callable[[nn.Module, int], dict] | None = None, eval_period: int = 0) -> int:
    """Train ``model`` in place on ``data``'s mini-batches, built ahead by ``num_workers`` threads
    (the rest: ``engine.train_loop``'s); returns how many unreadable images were passed over."""
    # The threads build the batches of the coming iterations (decoding and resizing release the GIL;
    # the proposal store need not pickle). An unexpected iteration restarts there.
    pool = ThreadPoolExecutor(num_workers, "frcn-data") if num_workers > 0 else None
    pending: dict[int, Future] = {}  # iteration -> its batch
    skipped: list[str] = []

    def next_batch(iteration: int) -> TrainBatch:
        if pool is None:
            return data.batch(iteration)
        for it in range(iteration, min(iteration + 2 * num_workers, max_iter)):
            if it not in pending:
                pending[it] = pool.submit(data.batch, it)
        future = pending.pop(iteration, None) or pool.submit(data.batch, iteration)
        for stale in [it for it in pending if it < iteration]:
            pending.pop(stale).cancel()
        return future.result()

    def step_fn(train_model: nn.Module, iteration: int) -> dict[str, Tensor]:
        batch = next_batch(iteration)
        for reason in batch.skipped_files:
            warnings.warn(f"skipping unreadable training image {reason}", stacklevel=2)
        skipped.extend(batch.skipped_files)
        class_logits, box_deltas = train_model(batch.images.to(device, non_blocking=True),
                                               batch.rois.to(device))
        return fast_rcnn_loss(class_logits, box_deltas, batch.labels.to(device),
                              batch.box_targets.to(device), bbox_loss_weight=bbox_loss_weight)

    try:
        train_loop(model=model, step_fn=step_fn, optimizer=optimizer, lr_at=lr_at, max_iter=max_iter,
                   output_dir=output_dir, checkpoint_period=checkpoint_period, log_period=log_period,
                   amp=amp, device=device, resume=resume,
                   checkpoint_extra={"class_names": model.class_names}, eval_fn=eval_fn,
                   eval_period=eval_period, desc="train fast_rcnn")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if skipped:
        print(f"skipped {len(skipped)} unreadable training images (listed in the warnings above)")
    return len(skipped)
