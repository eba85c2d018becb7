"""R-CNN training ([RCNN]): four resumable stages on warped regions.

Each stage is a folder of ``output_dir`` finished by a ``done`` settings marker: finetune/
(``engine.train_loop``), features/ (``feature_cache``), svm/ (``rcnn_svm``), bbox_reg/
(``box_regression``). Shapes: as in ``detect.training.feature_cache``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from detect.common.box_ops import box_iou
from detect.common.checkpoints import save_checkpoint
from detect.common.fileio import check_settings, read_json, write_json_atomic, write_settings
from detect.common.runtime import barrier, rank_and_world
from detect.data.datasets import ImageRecord, training_gt
from detect.data.images import ImageReadError, read_image
from detect.models.backbones import Backbone, inference_copy
from detect.models.rcnn import FineTuneNet, RegionNet, normalize_image, region_features, warp_regions
from detect.training.box_regression import train_box_regressors
from detect.training.engine import step_lr, train_loop
from detect.training.feature_cache import (FEATURE_FORMAT, FEATURE_VERSION, FeatureCache, ImageRows,
                                           ShardWriter, feature_cache_bytes, mean_feature_norm, norm_sample_images,
                                           norm_sample_rows, shard_name)
from detect.training.fast_rcnn_train import build_optimizer
from detect.training.rcnn_svm import load_arrays, save_arrays, train_svms


def image_rows(record: ImageRecord, proposals: np.ndarray, *, num_classes: int, bbox_min_iou: float,
               use_difficult: bool = True) -> ImageRows:
    """The rows of one training image: its trained-on gt boxes (``training_gt``) first, then its
    proposals. Overlaps per class use every gt box (a proposal on an ignored object is no
    negative), best IoU / class / box the trained-on ones; ``has_pool5``: best IoU > ``bbox_min_iou``."""
    gt_boxes = np.asarray(record.gt_boxes, np.float32).reshape(-1, 4)
    gt_classes = np.asarray(record.gt_classes, np.int64).reshape(-1)
    easy = training_gt(record, use_difficult)
    proposals = np.asarray(proposals, np.float32).reshape(-1, 4)
    boxes = np.concatenate([gt_boxes[easy], proposals])  # [R, 4]
    num_rows = len(boxes)
    iou = box_iou(boxes, gt_boxes).astype(np.float32)  # [R, G]
    overlaps = np.zeros((num_rows, num_classes), np.float32)
    for k in np.unique(gt_classes).tolist():
        overlaps[:, k - 1] = iou[:, gt_classes == k].max(axis=1)
    # the best trained-on gt box of each row; a last null box (IoU 0, class 0) wins only when there is none
    easy_iou = np.concatenate([iou[:, easy], np.zeros((num_rows, 1), np.float32)], axis=1)  # [R, E + 1]
    arg = easy_iou.argmax(axis=1)
    best_iou = easy_iou[np.arange(num_rows), arg]
    best_classes = np.append(gt_classes[easy], 0)[arg].astype(np.int16)
    best_gt_boxes = np.concatenate([gt_boxes[easy], np.zeros((1, 4), np.float32)])[arg]
    row_gt = np.concatenate([gt_classes[easy], np.zeros(len(proposals), np.int64)]).astype(np.int16)
    return ImageRows(image_id=int(record.image_id), boxes=boxes, gt_classes=row_gt, overlaps=overlaps,
                     best_iou=best_iou, best_classes=best_classes, best_gt_boxes=best_gt_boxes,
                     has_pool5=best_iou > bbox_min_iou)


class FineTuneSampler:
    """Fine-tuning mini-batches ([RCNN] code: Caffe WindowDataLayer), built from (seed, iteration).

    ``batch_size`` warped windows, ``fg_per_batch`` of them foreground (IoU >= ``fg_iou``, labelled
    with the gt's class), the rest background (0). Unlike the original (the whole dataset), they
    are drawn among the windows of ``images_per_batch`` random images, with replacement only when
    too few; mirrored with probability 0.5 (``flip``). Under DDP, rank r takes its own images.
    """

    def __init__(self, *, records: list[ImageRecord], get_proposals: Callable[[int], np.ndarray],
                 num_classes: int, crop_size: int, context_pad: int, pixel_mean, pixel_std,
                 device: torch.device, batch_size: int = 128, fg_per_batch: int = 32, fg_iou: float = 0.5,
                 images_per_batch: int = 4, flip: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 use_difficult: bool = True):
        if not records:
            raise ValueError("fine-tuning needs at least one training image")
        if not 0 <= fg_per_batch <= batch_size:
            raise ValueError(f"fg_per_batch {fg_per_batch} must be in [0, batch_size {batch_size}]")
        self.records, self.get_proposals = records, get_proposals
        self.num_classes, self.crop_size, self.context_pad = num_classes, crop_size, context_pad
        self.pixel_mean, self.pixel_std, self.device = pixel_mean, pixel_std, device
        self.batch_size, self.fg_per_batch, self.fg_iou = batch_size, fg_per_batch, fg_iou
        self.images_per_batch, self.flip, self.seed = images_per_batch, flip, seed
        self.rank = rank
        self.world_size = world_size
        self.use_difficult = use_difficult
        self.unreadable: dict[str, str] = {}

    def batch(self, iteration: int) -> tuple[Tensor, Tensor]:
        """crops [B, 3, crop, crop] (normalised, on the device) and labels [B] (0 = background)."""
        rng = np.random.default_rng([self.seed, iteration])
        per_rank = min(self.images_per_batch, max(len(self.records) // self.world_size, 1))
        chosen = rng.permutation(len(self.records))[self.rank * per_rank:(self.rank + 1) * per_rank]
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
                              bbox_min_iou=1.0, use_difficult=self.use_difficult)
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


class StreamingFeatures:
    """A ``detect.training.feature_cache.FeatureSource`` computing pool5 / fc7 with ``net`` when asked,
    one image read at a time: the source without a cache, and what ``extract_features`` writes."""

    def __init__(self, net: RegionNet, *, records: list[ImageRecord], get_proposals: Callable[[int], np.ndarray],
                 num_classes: int, crop_size: int, context_pad: int, pixel_mean, pixel_std, bbox_min_iou: float,
                 batch_size: int, amp: bool, fc7_dim: int, pool5_dim: int, use_difficult: bool = True):
        self.net, self.records, self.get_proposals = net, records, get_proposals
        self.num_images = len(records)
        self.num_classes = num_classes
        self.bbox_min_iou = bbox_min_iou
        self.crop_size, self.context_pad = crop_size, context_pad
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        self.batch_size = batch_size
        self.amp = amp
        self.use_difficult = use_difficult
        self.fc7_dim, self.pool5_dim = fc7_dim, pool5_dim
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
        rows = image_rows(record, proposals, num_classes=self.num_classes, bbox_min_iou=self.bbox_min_iou,
                          use_difficult=self.use_difficult)
        self._cached = (i, rows, image_t)
        return rows, image_t

    @torch.no_grad()
    def features(self, i: int, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        """pool5 [n, D5] and fc7 [n, D] (float32, on the device) of rows ``rows`` of image i."""
        info, image_t = self.load(i)
        boxes = torch.from_numpy(info.boxes[np.asarray(rows, np.int64)]).to(self.device)
        return region_features(self.net, image_t, boxes, crop_size=self.crop_size, context_pad=self.context_pad,
                               batch_size=self.batch_size, amp=self.amp)

    def rows(self, i: int) -> ImageRows:
        return self.load(i)[0]

    def fc7(self, i: int, rows: np.ndarray) -> np.ndarray:
        return self.features(i, rows)[1].cpu().numpy().reshape(-1, self.fc7_dim)

    def pool5(self, i: int, rows: np.ndarray) -> np.ndarray:
        return self.features(i, rows)[0].cpu().numpy().reshape(-1, self.pool5_dim)


def extract_features(source: StreamingFeatures, cache_dir: str | Path, *, images_per_shard: int = 64,
                     rank: int = 0, world_size: int = 1, progress: bool = True) -> None:
    """Cache fc7 of every row, pool5 of rows with IoU > bbox_min_iou and the norm sample's pool5
    norms (``feature_cache``); rank r writes the missing shards k with k % world_size == r."""
    cache_dir = Path(cache_dir)
    records, fc7_dim, pool5_dim = source.records, source.fc7_dim, source.pool5_dim
    num_shards = (len(records) + images_per_shard - 1) // images_per_shard
    meta = {"format": FEATURE_FORMAT, "version": FEATURE_VERSION, "num_images": len(records),
            "images_per_shard": images_per_shard, "num_shards": num_shards, "fc7_dim": fc7_dim,
            "pool5_dim": pool5_dim, "num_classes": source.num_classes, "bbox_min_iou": source.bbox_min_iou,
            "image_ids": [int(r.image_id) for r in records]}
    meta_path = cache_dir / "meta.json"
    if not meta_path.is_file():
        write_json_atomic(meta_path, meta)
    elif read_json(meta_path) != meta:
        raise ValueError(f"{meta_path}: a feature cache of another dataset or network is here; delete "
                         f"{cache_dir} or use another --output-dir")
    mine = [k for k in range(num_shards) if k % world_size == rank and not (cache_dir / shard_name(k)).is_dir()]
    norm_images = norm_sample_images(len(records))
    bar = tqdm(total=sum(len(records[k * images_per_shard:(k + 1) * images_per_shard]) for k in mine),
               desc="features", unit="img", disable=not progress, dynamic_ncols=True)
    for k in mine:
        writer = ShardWriter(cache_dir, k, fc7_dim=fc7_dim, pool5_dim=pool5_dim)
        for i in range(k * images_per_shard, min((k + 1) * images_per_shard, len(records))):
            rows = source.rows(i)
            pool5, fc7 = source.features(i, np.arange(len(rows)))
            pool5 = pool5.reshape(len(rows), pool5_dim)  # [R, D5]
            norms = None
            if i in norm_images:
                pick = torch.from_numpy(norm_sample_rows(i, len(rows))).to(pool5.device)
                norms = pool5[pick].double().norm(dim=1).cpu().numpy()
            pool5 = pool5[torch.from_numpy(rows.has_pool5).to(pool5.device)] if len(rows) else pool5
            writer.add(rows, fc7.cpu().numpy().reshape(-1, fc7_dim), pool5.cpu().numpy(), pool5_norms=norms)
            bar.update(1)
        writer.close()
    bar.close()


def _stage_done(stage_dir: Path, settings: dict) -> bool:
    """True if ``stage_dir`` finished with ``settings``; an error if it finished with others."""
    return check_settings(stage_dir / "done", settings,
                          hint="delete it (and the stages after it) to redo it with these settings, or "
                               "use another --output-dir")


def _mark_done(stage_dir: Path, settings: dict, seconds: float, **info) -> None:
    write_settings(stage_dir / "done", settings, seconds=round(seconds, 3), **info)


@dataclass(frozen=True)
class FineTuneSettings:
    """Stage 1 ([RCNN] code ``rcnn_finetune``; defaults: ``detect.common.config.RCNNConfig``)."""

    lr: float
    momentum: float
    weight_decay: float
    max_iter: int
    steps: list[int]
    batch_size: int  # windows per batch ...
    fg_per_batch: int  # ... of which foreground
    fg_iou: float
    gamma: float = 0.1
    flip: bool = True
    seed: int = 0
    checkpoint_period: int = 10000
    log_period: int = 20


@dataclass(frozen=True)
class SVMSettings:
    """Stage 3: ``rcnn_svm.mine_svms``' keywords plus the feature norm ([RCNN] rcnn_train.m)."""

    feat_norm: float
    C: float
    pos_weight: float
    intercept_scaling: float
    neg_iou: float
    hard_thresh: float
    evict_thresh: float
    retrain_limit: int
    passes: int
    workers: int = 0


def train_rcnn(backbone: Backbone, records: list[ImageRecord], get_proposals: Callable[[int], np.ndarray],
               output_dir: str | Path, *, num_classes: int, crop_size: int, context_pad: int,
               finetune: FineTuneSettings, svm: SVMSettings, bbox_lambda: float, bbox_min_iou: float,
               cache_features: bool = True, feature_batch_size: int = 128, amp: bool = True,
               fingerprint: dict | None = None, resume: bool = False, use_difficult: bool = True,
               device: torch.device = torch.device("cpu"),
               progress: bool = True) -> dict[str, np.ndarray] | None:
    """Train R-CNN's four stages in order ([RCNN]); ``backbone`` is fine-tuned in place.

    Returns the ``extra`` arrays of ``detect.models.build.build_rcnn`` on rank 0; the other ranks
    return None after the features, to wait in ``runtime.long_wait_group``. ``fingerprint`` (data,
    proposals, model) goes into every stage marker. A stage whose marker records these settings is
    skipped; ``resume`` continues the unfinished one. The SVMs train in spawned processes: a
    calling script needs the ``if __name__ == "__main__":`` guard.
    """
    output_dir = Path(output_dir)
    stage_dirs = {name: output_dir / name for name in ("finetune", "features", "svm", "bbox_reg")}
    if not resume and any(d.exists() for d in stage_dirs.values()):
        raise ValueError(f"{output_dir}: holds R-CNN stages already; pass --resume to continue (finished stages "
                         f"are skipped), or choose another --output-dir")
    barrier()  # every rank has looked before any writes
    ft_dir, feat_dir, svm_dir, bbox_dir = stage_dirs.values()
    rank, world = rank_and_world()
    fc7_dim, pool5_dim = backbone.head_dim, backbone.out_channels * backbone.roi_size ** 2
    net = RegionNet(body=backbone.body, head=backbone.head, roi_size=backbone.roi_size)
    warp = dict(crop_size=crop_size, context_pad=context_pad, pixel_mean=backbone.pixel_mean,
                pixel_std=backbone.pixel_std)

    ft_settings = {"data": fingerprint or {}, "crop_size": crop_size, "context_pad": context_pad,
                   "finetune": asdict(finetune), "use_difficult": use_difficult}
    if not _stage_done(ft_dir, ft_settings):
        t0 = time.perf_counter()
        model = FineTuneNet(net=net, head_dim=fc7_dim, num_classes=num_classes)
        sampler = FineTuneSampler(records=records, get_proposals=get_proposals, num_classes=num_classes,
                                  device=device, batch_size=finetune.batch_size, fg_per_batch=finetune.fg_per_batch,
                                  fg_iou=finetune.fg_iou, flip=finetune.flip, seed=finetune.seed, rank=rank,
                                  world_size=world, use_difficult=use_difficult, **warp)

        def step_fn(train_model: nn.Module, iteration: int) -> dict[str, Tensor]:
            crops, labels = sampler.batch(iteration)
            if labels.numel() == 0:  # no readable region: a zero loss through train_model (DDP's all-reduce)
                return {"loss_cls": train_model(crops).sum() * 0.0}
            return {"loss_cls": F.cross_entropy(train_model(crops).float(), labels)}

        # [RCNN] fine-tuning prototxt: the new classifier at 10x lr
        optimizer = build_optimizer(model, lr=finetune.lr, momentum=finetune.momentum,
                                    weight_decay=finetune.weight_decay,
                                    lr_scale_of=lambda name: 10.0 if name.startswith("cls_score.") else 1.0)
        train_loop(model=model, step_fn=step_fn, optimizer=optimizer,
                   lr_at=step_lr(finetune.lr, finetune.steps, finetune.gamma, 0, 1.0),  # [RCNN]: no warm-up
                   max_iter=finetune.max_iter, output_dir=ft_dir, checkpoint_period=finetune.checkpoint_period,
                   log_period=finetune.log_period, amp=amp, device=device,
                   checkpoint_extra={"stage": "rcnn_finetune"}, resume=resume, desc="R-CNN fine-tune",
                   tb_dir=output_dir / "tb")
        if rank == 0:
            save_checkpoint(ft_dir / "net.pt", {k: v.detach().cpu() for k, v in net.state_dict().items()})
            _mark_done(ft_dir, ft_settings, time.perf_counter() - t0, unreadable_images=sampler.unreadable)
        barrier()
    net.load_state_dict(torch.load(ft_dir / "net.pt", map_location="cpu", weights_only=True))
    net.to(device).eval()
    # Features come from the fine-tuned net with BatchNorm folded (equal up to float rounding).
    streaming = StreamingFeatures(inference_copy(net), records=records, get_proposals=get_proposals,
                                  num_classes=num_classes, bbox_min_iou=bbox_min_iou, batch_size=feature_batch_size,
                                  amp=amp, fc7_dim=fc7_dim, pool5_dim=pool5_dim, use_difficult=use_difficult, **warp)

    feat_settings = {"upstream": ft_settings, "cache_features": cache_features, "bbox_min_iou": bbox_min_iou,
                     "pool5_rows": "iou > bbox_min_iou", "format_version": FEATURE_VERSION}
    if cache_features and not _stage_done(feat_dir, feat_settings):
        t0 = time.perf_counter()
        extract_features(streaming, feat_dir, rank=rank, world_size=world, progress=progress)
        barrier()  # every rank has written its shards
        if rank == 0:
            _mark_done(feat_dir, feat_settings, time.perf_counter() - t0, bytes=feature_cache_bytes(feat_dir),
                       unreadable_images=streaming.unreadable)
        barrier()
    source = FeatureCache(feat_dir) if cache_features else streaming
    if rank != 0:  # the SVMs and regressors are cheap next to the CNN: rank 0 alone trains them
        return None  # the caller waits for rank 0 in a group with a long timeout (``long_wait_group``)

    svm_options = {k: v for k, v in asdict(svm).items() if k not in ("feat_norm", "workers")}
    svm_settings = {"upstream": feat_settings, "feat_norm": svm.feat_norm, **svm_options}
    if not _stage_done(svm_dir, svm_settings):
        t0 = time.perf_counter()
        feat_scale = svm.feat_norm / mean_feature_norm(source, "fc7")
        weight, bias, stats = train_svms(source, svm_dir, num_classes=num_classes, workers=svm.workers,
                                         feat_scale=feat_scale, progress=progress, **svm_options)
        save_arrays(svm_dir / "svm.npz", weight=weight, bias=bias, feat_scale=np.float64(feat_scale))
        _mark_done(svm_dir, svm_settings, time.perf_counter() - t0, classes=stats)

    bbox_settings = {"upstream": feat_settings, "feat_norm": svm.feat_norm, "lambda": bbox_lambda,
                     "min_iou": bbox_min_iou}
    if not _stage_done(bbox_dir, bbox_settings):
        t0 = time.perf_counter()
        pool5_scale = svm.feat_norm / mean_feature_norm(source, "pool5")
        reg = train_box_regressors(source, num_classes=num_classes, feat_scale=pool5_scale, lam=bbox_lambda,
                                   min_iou=bbox_min_iou, progress=progress)
        save_arrays(bbox_dir / "bbox_reg.npz", weight=reg.weight, bias=reg.bias, target_mean=reg.target_mean,
                     target_std=reg.target_std, pool5_scale=np.float64(pool5_scale))
        _mark_done(bbox_dir, bbox_settings, time.perf_counter() - t0, classes=reg.stats)

    times = {name: read_json(d / "done")["seconds"] for name, d in stage_dirs.items() if (d / "done").is_file()}
    write_json_atomic(output_dir / "rcnn_stages.json", {"seconds": times})
    svm_arrays, reg_arrays = load_arrays(svm_dir / "svm.npz"), load_arrays(bbox_dir / "bbox_reg.npz")
    return {"svm_weight": svm_arrays["weight"], "svm_bias": svm_arrays["bias"], "feat_scale": svm_arrays["feat_scale"],
            **{f"bbox_{k}": reg_arrays[k] for k in ("weight", "bias", "target_mean", "target_std")}}
