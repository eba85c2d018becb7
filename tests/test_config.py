"""Strict YAML configs: unknown keys, wrong types and bad values name the key and the file."""

from __future__ import annotations

import pytest

from detect.common.config import ConfigError, load_config, save_config


def _write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_defaults_follow_the_papers():
    cfg = load_config(None)
    assert cfg.train.images_per_batch == 2 and cfg.train.rois_per_image == 64  # [FRCN] N=2, R=128
    assert cfg.train.fg_fraction == 0.25 and cfg.train.bbox_std == [0.1, 0.1, 0.2, 0.2]
    assert cfg.test.nms_thresh == 0.3 and cfg.proposals.min_size == 20 and cfg.proposals.resize == 500
    assert cfg.rcnn.svm_C == 0.001 and cfg.rcnn.context_pad == 16


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: 0.01\n  lrr: 3\n", "unknown key 'train.lrr'"),
    ("detectr: rcnn\n", "unknown key 'detectr'"),
    ("train:\n  max_iter: ten\n", "'train.max_iter' must be an integer"),
    ("train:\n  flip: 1\n", "'train.flip' must be true or false"),
    ("train:\n  scales: 600\n", "'train.scales' must be a list"),
    ("test:\n  nms_thresh: 1.5\n", "'test.nms_thresh' must be in [0, 1]"),
    ("proposals:\n  mode: slow\n", "'proposals.mode' must be fast, quality or single"),
    ("detector: yolo\n", "'detector' must be fast_rcnn or rcnn"),
    ("model:\n  feature_stride: 4\n", "'model.feature_stride' must be 16 or 8"),
    ("model:\n  roi_sampling_ratio: -1\n", "'model.roi_sampling_ratio' must be >= 0"),
    ("train: [1, 2]\n", "'train' must be a mapping"),
    ("train:\n  lr: [0.1\n", "malformed YAML"),
])
def test_bad_configs_name_the_key_and_the_file(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_overrides_are_typed_and_checked(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0.01\n")
    cfg = load_config(path, ["train.lr=0.02", "train.scales=[480, 576]", "train.flip=false"])
    assert cfg.train.lr == 0.02 and cfg.train.scales == [480, 576] and cfg.train.flip is False
    assert isinstance(load_config(path, ["train.lr=1"]).train.lr, float)  # int widens to float
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.lr"])


def test_a_key_the_detector_does_not_read_is_an_error_not_ignored(tmp_path):
    """R-CNN's fine-tuning schedule is rcnn.ft_*: train.lr (Fast R-CNN's) set for an R-CNN is
    refused, and so is an rcnn key set for a Fast R-CNN; the keys both read are accepted."""
    path = _write(tmp_path, "detector: rcnn\ntrain:\n  flip: false\n  seed: 3\nrcnn:\n  ft_lr: 0.01\n")
    assert load_config(path).rcnn.ft_lr == 0.01
    with pytest.raises(ConfigError, match="'train.lr' does not apply to detector rcnn .*rcnn.ft_"):
        load_config(path, ["train.lr=0.01"])
    with pytest.raises(ConfigError, match="'train.eval_period' does not apply to detector rcnn"):
        load_config(path, ["train.eval_period=5"])
    with pytest.raises(ConfigError, match="'rcnn.ft_lr' does not apply to detector fast_rcnn"):
        load_config(path, ["detector=fast_rcnn"])
    assert load_config(path, ["train.lr=0.001"]).detector == "rcnn"  # the default value is no setting


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["train.lr=0.005", "model.backbone=resnet18", "model.feature_stride=8",
                             "model.roi_sampling_ratio=0", "model.roi_aligned=false"])
    assert (cfg.model.feature_stride, cfg.model.roi_sampling_ratio, cfg.model.roi_aligned) == (8, 0, False)
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load_and_the_synthetic_pair_is_a_fair_comparison():
    """Every config in configs/ loads strictly; the two CPU configs share data and proposals."""
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    loaded = {p.stem: load_config(p) for p in configs}
    frcn, rcnn = loaded["fast_rcnn_synthetic_cpu"], loaded["rcnn_synthetic_cpu"]
    assert frcn.detector == "fast_rcnn" and rcnn.detector == "rcnn"
    assert frcn.data == rcnn.data and frcn.proposals == rcnn.proposals
    assert frcn.model.backbone == rcnn.model.backbone  # same backbone family
    assert (frcn.test.nms_thresh, frcn.test.detections_per_image) == (rcnn.test.nms_thresh,
                                                                      rcnn.test.detections_per_image)
