"""Config -> detector: the one place that knows every detector kind (a plain if/elif, as DETR's
``build(args)``), and the loader of trained detectors (``load_detector``). The config object is
read here and in ``detect.commands`` only; everything below takes plain values.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from detect.common.checkpoints import DETECTOR_FORMAT, load_checkpoint
from detect.common.config import Config, apply_override, check_proposal_settings, from_dict, to_dict
from detect.common.runtime import resolve_device
from detect.models.backbones import Backbone, build_backbone
from detect.models.detector import Detector
from detect.models.fast_rcnn import FastRCNN
from detect.models.rcnn import RCNN


def build_backbone_from(cfg: Config, *, weights: str | None = None) -> Backbone:
    """The backbone of ``cfg.model`` (``weights`` overrides ``cfg.model.weights``)."""
    m = cfg.model
    return build_backbone(m.backbone, weights=m.weights if weights is None else weights,
                          freeze_at=m.freeze_at, head_dim=m.head_dim, dropout=m.dropout,
                          roi_size=m.roi_size, feature_stride=m.feature_stride)


def _detector_settings(cfg: Config, class_names: list[str], category_ids: list[int] | None) -> dict:
    """What both detectors take from a config: classes, proposals, post-processing, AMP."""
    t = cfg.test
    return dict(class_names=list(class_names), category_ids=category_ids,
                proposal_settings=check_proposal_settings(to_dict(cfg.proposals)), proposal_top_k=cfg.proposals.top_k,
                backbone_name=cfg.model.backbone, amp=cfg.train.amp, score_thresh=t.score_thresh,
                nms_thresh=t.nms_thresh, detections_per_image=t.detections_per_image,
                per_class_top_k=t.per_class_top_k, box_regression=t.box_regression)


def build_fast_rcnn(cfg: Config, class_names: list[str], category_ids: list[int] | None = None, *,
                    backbone: Backbone | None = None) -> FastRCNN:
    """The one place a ``FastRCNN`` is made from a config."""
    m = cfg.model
    return FastRCNN(backbone=backbone or build_backbone_from(cfg), roi_op=m.roi_op,
                    roi_sampling_ratio=m.roi_sampling_ratio, roi_aligned=m.roi_aligned,
                    bbox_std=tuple(cfg.train.bbox_std), test_scale=cfg.test.scale, test_scales=cfg.test.scales,
                    test_max_size=cfg.test.max_size, **_detector_settings(cfg, class_names, category_ids))


def build_rcnn(cfg: Config, class_names: list[str], extra: dict, category_ids: list[int] | None = None, *,
               backbone: Backbone | None = None) -> RCNN:
    """An ``RCNN`` from a config and the trained tensors ``extra`` of ``detect.training.rcnn_train``;
    without ``backbone`` it starts random (weights "none"): load the trained state dict next."""
    backbone = backbone or build_backbone_from(cfg, weights="none")
    arrays = {k: extra[k] for k in ("svm_weight", "svm_bias", "bbox_weight", "bbox_bias", "bbox_target_mean",
                                    "bbox_target_std")}
    return RCNN(backbone=backbone, crop_size=cfg.rcnn.crop_size or backbone.crop_size,
                context_pad=cfg.rcnn.context_pad, feat_scale=float(extra["feat_scale"]),
                test_chunk=cfg.rcnn.test_chunk, **arrays, **_detector_settings(cfg, class_names, category_ids))


def build_from_checkpoint(ckpt: dict, source: str = "checkpoint", *, overrides: list[str] = ()) -> Detector:
    """Rebuild a trained detector from a detector checkpoint dict (``load_checkpoint``): the
    config inside gives the architecture, the state dict is loaded strictly, then ``test.svd``
    applies. ``overrides`` (``key=value``) change test-time settings, e.g. ``proposals.top_k=100``.
    """
    kind = ckpt.get("kind")
    data = copy.deepcopy(ckpt["config"])
    for item in overrides:
        apply_override(data, item)
    cfg = from_dict(data, f"{source} (config{' + ' + ' '.join(overrides) if overrides else ''})")
    class_names, category_ids = list(ckpt["class_names"]), ckpt.get("category_ids")  # None: 1..K
    if kind == "fast_rcnn":
        model = build_fast_rcnn(cfg, class_names, category_ids, backbone=build_backbone_from(cfg, weights="none"))
    elif kind == "rcnn":
        model = build_rcnn(cfg, class_names, ckpt["extra"], category_ids)
    else:
        raise ValueError(f"{source}: unknown detector kind {kind!r} (expected fast_rcnn or rcnn)")
    model.load_state_dict(ckpt["model"])
    if kind == "fast_rcnn" and cfg.test.svd:
        model.apply_svd(cfg.test.svd_fc6, cfg.test.svd_fc7)
    return model.eval()


def load_detector(checkpoint: str | Path, device: str | torch.device | None = None, *,
                  overrides: list[str] = ()) -> Detector:
    """The detector saved in ``checkpoint``, in eval mode on ``device`` ('' or None: the GPU when
    there is one), with test-time config ``overrides`` (``build_from_checkpoint``)."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("format") != DETECTOR_FORMAT:
        raise ValueError(f"{checkpoint}: a training-state checkpoint, not a trained detector "
                         "(use the run's model_final.pt)")
    try:
        detector = build_from_checkpoint(ckpt, str(checkpoint), overrides=overrides)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"{checkpoint}: does not match a {ckpt.get('kind')} model "
                         f"({str(e).splitlines()[0]})") from None
    return detector.to(resolve_device(str(device) if device is not None else "")).eval()
