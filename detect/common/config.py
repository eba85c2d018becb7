"""Typed, strict configuration: small nested dataclasses loaded from YAML; the one place that
documents every field and where its default comes from.

Papers: [RCNN] Girshick et al. 2014 and the original ``rcnn`` code; [FRCN] Girshick 2015 and
``rbgirshick/fast-rcnn`` (``lib/fast_rcnn/config.py``); [SS] Uijlings et al. 2013.

An unknown key or a value of the wrong type raises ``ConfigError`` naming the key and the
file; ``key=value`` overrides (``train.lr=0.01``) are parsed as YAML scalars and checked alike.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detect.common.fileio import write_text_atomic


class ConfigError(ValueError):
    """A bad config file, key or value. The message names the key and the file."""


@dataclass
class DatasetConfig:
    # "coco": an instances JSON plus an image folder. "voc": a VOC2007-style folder with
    # Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt.
    format: str = "coco"
    # coco: the instances JSON. voc: the dataset folder (e.g. VOCdevkit/VOC2007).
    path: str = ""
    # coco: the image folder (file_name entries are relative to it). voc: unused.
    images: str = ""
    # voc: the split name in ImageSets/Main. coco: unused.
    split: str = ""
    # voc: class names of classes 1..K (empty: as detect.data.datasets.load_voc chooses them; the
    # val split uses the trained detector's). coco: the categories' names, checked when given.
    classes: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig = field(default_factory=DatasetConfig)
    # Proposal stores (see detect.proposals). Computed by `detect propose` if missing.
    train_proposals: str = ""
    val_proposals: str = ""


@dataclass
class ProposalConfig:
    # "ours": our implementation of [SS] (detect.proposals.ss); "opencv": OpenCV's ximgproc
    # machinery assembled with the paper's settings (detect.proposals.selective_search).
    engine: str = "ours"
    # [SS] section 5.2's modes, "fast", "quality" or "single" (the table: detect.proposals.ss.engine);
    # [RCNN] code selective_search_boxes.m runs "fast".
    mode: str = "fast"
    # [RCNN] selective_search_boxes.m resized each image to 500 px wide (0 = no resize).
    resize: int = 500
    # Which side `resize` sets: "width" ([RCNN]), "longer" or "shorter".
    resize_side: str = "width"
    # [RCNN] FilterBoxesWidth(boxes, 20): drop boxes with a side under 20 px of the RESIZED image.
    min_size: int = 20
    # The detectors score the first top_k boxes of each image (0 = all), in training and at test:
    # the one cut, ``detect.proposals.selective_search.first_proposals``; stores keep every box.
    # The paper configs keep all (fast mode gives ~2000 per VOC image); 2000 is fast-rcnn's cap
    # for COCO (lib/datasets/coco.py top_k).
    top_k: int = 2000
    # Seed of [SS]'s pseudo-random ranking (position x uniform random), engine "ours".
    seed: int = 0
    # Order of the boxes, which `top_k` cuts. "paper": [SS]'s pseudo-random ranking. "nms": the
    # boxes greedy NMS at `nms_iou` would suppress moved behind the rest, so a budget holds fewer
    # near-duplicates (BENCHMARKS.md, "Recall at a budget, per ranking").
    ranking: str = "paper"
    nms_iou: float = 0.7
    # The mode's k values ([SS]: 50, 100, 150, 300; min size = k) times this. 1 = the paper's;
    # smaller cuts smaller initial regions, which small, touching objects need (nuclei: 0.25).
    # `detect tune-proposals` tries 1, 0.5 and 0.25.
    k_scale: float = 1.0


@dataclass
class ModelConfig:
    # vgg16 ([FRCN] model L), alexnet (close to [FRCN] model S), resnet18, resnet50,
    # mobilenet_v3_large, googlenet (Inception v1, torchvision), densenet121 (torchvision),
    # efficientnet_lite0 (ImageNet weights installed offline).
    backbone: str = "vgg16"
    # "none", a torchvision weights name (e.g. IMAGENET1K_V1), "default" (the backbone's own
    # offline weights, efficientnet_lite0 only), or a path to a state_dict file.
    weights: str = "IMAGENET1K_V1"
    # Freeze the backbone's first layers: [FRCN] fine-tunes VGG16 from conv3_1 up (so conv1
    # and conv2 stay frozen). Names are per backbone, see detect.models.backbones.
    freeze_at: str = "conv3_1"
    # Stride of the conv feature map: [FRCN] 16. 8 (not in the papers, for small objects)
    # dilates the body's last stage instead of striding it (detect.models.backbones).
    feature_stride: int = 16
    # [FRCN] RoI max pooling to 7x7 (roi_pool); roi_align is an option.
    roi_op: str = "roi_pool"
    roi_size: int = 7
    # roi_align only (torchvision.ops.roi_align): bilinear samples per bin side (2: torchvision's
    # MultiScaleRoIAlign; 0 = adaptive, ceil(RoI size / S) as torchvision's own default), and
    # aligned=True, the half-pixel shift of detectron2's ROIAlignV2 (False: Mask R-CNN's original).
    roi_sampling_ratio: int = 2
    roi_aligned: bool = True
    # Width of the two fc layers of the head when the backbone has none ([FRCN] fc6/fc7: 4096).
    head_dim: int = 4096
    # [FRCN] dropout 0.5 on fc6 and fc7 during training.
    dropout: float = 0.5


@dataclass
class TrainConfig:
    # Both detectors read SHARED_TRAIN; the rest is Fast R-CNN's (R-CNN fine-tunes with `rcnn`'s ft_*).
    # [FRCN] hierarchical sampling: N=2 images, R=128 RoIs per mini-batch (64 per image).
    images_per_batch: int = 2
    rois_per_image: int = 64
    # [FRCN] 25% foreground (IoU >= 0.5), background IoU in [0.1, 0.5).
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou_low: float = 0.1
    bg_iou_high: float = 0.5
    # [FRCN] shorter side 600, longer side at most 1000; more scales = multi-scale training.
    scales: list[int] = field(default_factory=lambda: [600])
    max_size: int = 1000
    # [FRCN] horizontal flip augmentation.
    flip: bool = True
    # Train on VOC difficult objects, as both papers' code does (fast-rcnn pascal_voc.py, rcnn
    # roidb_from_voc.m). COCO crowd boxes are never trained on.
    use_difficult: bool = True
    # [FRCN] SGD, lr 0.001, momentum 0.9, weight decay 5e-4; lr x0.1 at `steps`.
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0005
    # [FRCN] VOC07: 40k iterations, step at 30k.
    max_iter: int = 40000
    steps: list[int] = field(default_factory=lambda: [30000])
    gamma: float = 0.1
    # Linear warm-up (not in [FRCN]; detectron2's default shape).
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    # [FRCN] lambda = 1 weighting smooth-L1 against the log loss. Box targets are divided by
    # the fixed std (0.1, 0.1, 0.2, 0.2): py-faster-rcnn's BBOX_NORMALIZE_STDS ([FRCN] itself
    # measured per-class stds on the training set).
    bbox_loss_weight: float = 1.0
    bbox_std: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.2, 0.2])
    # Mixed precision, CUDA only.
    amp: bool = True
    checkpoint_period: int = 10000
    # Every eval_period iterations, COCO AP / AP50 on data.val go into log.jsonl (not in
    # [FRCN]; 0 = only at the end). Fast R-CNN only: an R-CNN has no detector before its SVMs.
    eval_period: int = 0
    log_period: int = 20
    seed: int = 0
    num_workers: int = 2


@dataclass
class RCNNConfig:
    # [RCNN] context padding: p = 16 pixels of context around each warped proposal.
    context_pad: int = 16
    # Warp size: 224 for VGG16 ([RCNN] code), 227 for AlexNet. 0 = the backbone's default.
    crop_size: int = 0
    # Fine-tuning, its whole schedule ([RCNN] code rcnn_finetune): batches of 128 = 32 fg +
    # 96 bg, lr 0.001, x ft_gamma at ft_steps, no warm-up.
    ft_batch_size: int = 128
    ft_fg_per_batch: int = 32
    ft_fg_iou: float = 0.5
    ft_lr: float = 0.001
    ft_momentum: float = 0.9
    ft_weight_decay: float = 0.0005
    ft_max_iter: int = 40000
    ft_steps: list[int] = field(default_factory=lambda: [20000])
    ft_gamma: float = 0.1
    # Feature stage: cache features to disk as float16 shards (False = stream them).
    cache_features: bool = True
    feature_batch_size: int = 128
    # SVMs ([RCNN] code rcnn_train.m): C=0.001, positive weight 2, bias (intercept) scaling 10,
    # features scaled to an average L2 norm of 20, negatives IoU < 0.3.
    svm_C: float = 0.001
    svm_pos_weight: float = 2.0
    svm_intercept_scaling: float = 10.0
    svm_feat_norm: float = 20.0
    svm_neg_iou: float = 0.3
    # Hard-negative mining: add negatives scoring > -1.0001, evict those < -1.2, retrain
    # after ~2000 new negatives ([RCNN] code).
    svm_hard_thresh: float = -1.0001
    svm_evict_thresh: float = -1.2
    svm_retrain_limit: int = 2000
    svm_passes: int = 1
    svm_workers: int = 0  # processes for per-class training; 0 = all cores
    # Box regression ([RCNN] appendix C; code bbox_regression/rcnn_train_bbox_regressor.m):
    # ridge, lambda = 1000 on weights and bias alike, from proposals with IoU strictly > 0.6
    # (O > opts.min_overlap), on pool5 scaled to mean norm 20 over random rows (rcnn_feature_stats.m).
    bbox_ridge_lambda: float = 1000.0
    bbox_min_iou: float = 0.6
    # Proposals scored per chunk at test time (bounds memory).
    test_chunk: int = 512


@dataclass
class TestConfig:
    # [FRCN] test: shorter side 600, longer at most 1000 (TEST.SCALES (600,), TEST.MAX_SIZE).
    scale: int = 600
    max_size: int = 1000
    # Fast R-CNN multi-scale test ([FRCN] Table 7: 480, 576, 688, 864, 1200): an image pyramid,
    # each proposal scored on the level where its area is closest to 224^2 (fast-rcnn
    # lib/fast_rcnn/test.py::_project_im_rois). Empty = the single `scale`.
    scales: list[int] = field(default_factory=list)
    # Post-processing, shared by both detectors: score threshold 0.05 (fast-rcnn test.py::test_net
    # thresh), per-class NMS 0.3 ([FRCN] TEST.NMS).
    score_thresh: float = 0.05
    nms_thresh: float = 0.3
    # At most this many detections per image over all classes, after NMS (0 = no cap): 100 is
    # fast-rcnn test.py::test_net's max_per_image and COCO's limit.
    detections_per_image: int = 100
    # At most this many boxes per class per image, best first, before NMS (0 = no cap): rcnn
    # rcnn_test.m keeps 100 per class (its dataset-wide max_per_set is not implemented).
    per_class_top_k: int = 0
    # [FRCN] section 3.1: truncated SVD, top 1024 singular values of fc6, 256 of fc7.
    svd: bool = False
    svd_fc6: int = 1024
    svd_fc7: int = 256
    # False: detections keep their proposals' boxes, no box regression (an ablation: [RCNN]
    # Table 2 compares with and without it). `detect eval/bench --no-box-regression` sets it.
    box_regression: bool = True


@dataclass
class Config:
    # "fast_rcnn" or "rcnn".
    detector: str = "fast_rcnn"
    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rcnn: RCNNConfig = field(default_factory=RCNNConfig)
    test: TestConfig = field(default_factory=TestConfig)


# The keys one detector does not read: setting one (to other than its default) is an error, not
# silently ignored. R-CNN reads from `train` only what both detectors share.
SHARED_TRAIN = ("flip", "use_difficult", "amp", "checkpoint_period", "log_period", "seed")
FAST_RCNN_ONLY = {"train": tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in SHARED_TRAIN)}
RCNN_ONLY = {"rcnn": tuple(f.name for f in dataclasses.fields(RCNNConfig))}

T = typing.TypeVar("T")
_SCALARS = {float: ((int, float), "a number"), int: (int, "an integer"), bool: (bool, "true or false"),
            str: (str, "a string")}  # type -> (accepted Python types, as the error says it)


def _check_value(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key`` and ``source``."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, source)
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp in _SCALARS:
        accepted, what = _SCALARS[tp]
        if not isinstance(value, accepted) or (isinstance(value, bool) and tp is not bool):
            raise ConfigError(f"{source}: '{key}' must be {what}, got {value!r}")
        return float(value) if tp is float else value
    raise ConfigError(f"{source}: '{key}': unsupported type {tp}")


def _build(cls: type[T], data: dict, prefix: str, source: str) -> T:
    hints = typing.get_type_hints(cls)  # field name -> type, for every field
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(hints))})")
        kwargs[k] = _check_value(v, hints[k], key, source)
    return cls(**kwargs)


def from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build a config from a nested dict, strictly. ``source`` names the origin in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    cfg = _build(Config, data, "", source)
    validate(cfg, source)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    source = "<defaults>" if path is None else str(path)
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: malformed YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping")
    for item in overrides or []:
        apply_override(data, item)
    return from_dict(data, source if not overrides else f"{source} + overrides {overrides}")


def apply_override(data: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.lr=0.01)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{p}' is not a section")
    node[parts[-1]] = value


def validate(cfg: Config, source: str) -> None:
    """Range and choice checks that types alone cannot express."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: '{key}' {msg}")

    need(cfg.detector in ("fast_rcnn", "rcnn"), "detector", f"must be fast_rcnn or rcnn, got {cfg.detector!r}")
    unused = FAST_RCNN_ONLY if cfg.detector == "rcnn" else RCNN_ONLY
    for section, keys in unused.items():
        ours, default = getattr(cfg, section), type(getattr(cfg, section))()
        for key in keys:
            need(getattr(ours, key) == getattr(default, key), f"{section}.{key}",
                 f"does not apply to detector {cfg.detector}" +
                 (" (its fine-tuning schedule is rcnn.ft_*)" if section == "train" else ""))
    for name in ("train", "val"):
        ds = getattr(cfg.data, name)
        need(ds.format in ("coco", "voc"), f"data.{name}.format", f"must be coco or voc, got {ds.format!r}")
    _validate_proposals(cfg.proposals, source, "proposals.")
    for key in ("model.roi_size", "train.images_per_batch", "train.rois_per_image", "train.lr", "train.max_iter",
                "train.checkpoint_period", "rcnn.svm_C", "rcnn.test_chunk"):
        section, name = key.split(".")
        need(getattr(getattr(cfg, section), name) > 0, key, "must be > 0")
    m = cfg.model
    need(m.roi_op in ("roi_pool", "roi_align"), "model.roi_op", f"must be roi_pool or roi_align, got {m.roi_op!r}")
    need(m.feature_stride in (8, 16), "model.feature_stride", f"must be 16 or 8, got {m.feature_stride}")
    need(m.roi_sampling_ratio >= 0, "model.roi_sampling_ratio", "must be >= 0 (0 = adaptive)")
    need(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    t = cfg.train
    need(0.0 <= t.fg_fraction <= 1.0, "train.fg_fraction", "must be in [0, 1]")
    need(0.0 <= t.bg_iou_low <= t.bg_iou_high <= t.fg_iou <= 1.0, "train.bg_iou_low",
         "needs 0 <= bg_iou_low <= bg_iou_high <= fg_iou <= 1")
    need(len(t.scales) > 0 and all(s > 0 for s in t.scales), "train.scales", "must be positive sizes")
    need(len(t.bbox_std) == 4 and all(s > 0 for s in t.bbox_std), "train.bbox_std", "must be 4 positive numbers")
    need(t.eval_period >= 0, "train.eval_period", "must be >= 0 (0 = only at the end)")
    r = cfg.rcnn
    need(r.context_pad >= 0, "rcnn.context_pad", "must be >= 0")
    need(0 < r.ft_fg_per_batch <= r.ft_batch_size, "rcnn.ft_fg_per_batch", "must be in (0, ft_batch_size]")
    need(r.svm_evict_thresh < r.svm_hard_thresh, "rcnn.svm_evict_thresh", "must be below svm_hard_thresh")
    e = cfg.test
    need(0.0 <= e.nms_thresh <= 1.0, "test.nms_thresh", "must be in [0, 1]")
    need(e.detections_per_image >= 0, "test.detections_per_image", "must be >= 0 (0 = no cap)")
    need(e.per_class_top_k >= 0, "test.per_class_top_k", "must be >= 0 (0 = no cap)")
    need(all(s > 0 for s in e.scales), "test.scales", "must be positive sizes")


PROPOSAL_CHOICES = {"engine": ("ours", "opencv"), "mode": ("fast", "quality", "single"),
                    "resize_side": ("width", "longer", "shorter"), "ranking": ("paper", "nms")}


def _validate_proposals(p: ProposalConfig, source: str, prefix: str) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: '{prefix}{key}' {msg}")

    for key, choices in PROPOSAL_CHOICES.items():
        value = getattr(p, key)
        need(value in choices, key, f"must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
    for key in ("resize", "min_size", "top_k", "seed"):
        need(getattr(p, key) >= 0, key, "must be >= 0")
    need(0.0 < p.nms_iou <= 1.0, "nms_iou", "must be in (0, 1]")
    need(p.k_scale > 0.0, "k_scale", "must be > 0")


def check_proposal_settings(settings: dict, source: str = "proposal settings") -> dict:
    """``settings`` (some of ``ProposalConfig``'s fields) checked as a config's ``proposals``
    section -> selective search's keyword arguments: every field, defaults filled in, but
    ``top_k`` (the detectors' cut, not the search's)."""
    proposals = _build(ProposalConfig, settings, "", source)
    _validate_proposals(proposals, source, "")
    return {k: v for k, v in to_dict(proposals).items() if k != "top_k"}


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
