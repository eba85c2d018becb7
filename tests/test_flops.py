"""FLOP counts: a tiny known model by hand, detectors' stages, the papers' settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detect.common.config import Config
from detect.evaluation.bench import count_flops, detector_flops, paper_flops
from detect.models.build import build_fast_rcnn


def test_one_conv_and_one_linear_against_a_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 10 * 12, 5))
    # conv: 8 outputs channels x 10 x 12 positions x (3 x 3 x 3) multiply-adds; linear: 960 x 5.
    by_hand = 2 * (8 * 10 * 12 * 27) + 2 * (960 * 5)
    assert count_flops(model, (1, 3, 10, 12)) == by_hand
    assert count_flops(model, (2, 3, 10, 12)) == 2 * by_hand
    assert model[0].weight.device.type == "cpu"  # counted on a meta copy, the model is untouched


def _tiny_fast_rcnn(top_k: int = 0):
    cfg = Config()
    cfg.model.backbone, cfg.model.weights, cfg.model.freeze_at = "efficientnet_lite0", "none", ""
    cfg.model.head_dim, cfg.model.roi_size = 32, 3
    cfg.test.scale, cfg.test.max_size = 64, 96
    cfg.proposals.top_k = top_k
    return build_fast_rcnn(cfg, ["a", "b"])


def test_fast_rcnn_head_flops_scale_with_proposals_and_top_k_trims_them():
    model = _tiny_fast_rcnn()
    f10, f20 = detector_flops(model, (128, 128), 10), detector_flops(model, (128, 128), 20)
    assert f10["backbone"] == f20["backbone"] > 0
    assert f20["roi_head"] == 2 * f10["roi_head"]
    assert detector_flops(_tiny_fast_rcnn(top_k=10), (128, 128), 20) == f10
    # The image is resized to the test scale first: 128 and 256 px squares both become 64 px.
    assert detector_flops(model, (256, 256), 10) == f10


def test_paper_settings_vgg16():
    p = paper_flops()
    # VGG16 on one 224 px image is 15.47 G multiply-adds (conv + fc6 + fc7, no fc8): 2,000 warps.
    per_warp = p["rcnn"]["features"] / 2000 / 2
    assert per_warp == pytest.approx(15.47e9 - 4096 * 1000, rel=0.01)
    # Fast R-CNN's fc6 + fc7 per RoI: 25088 x 4096 + 4096 x 4096 multiply-adds, then 21 + 80 outputs.
    per_roi = 2 * (25088 * 4096 + 4096 * 4096 + 4096 * 21 + 4096 * 80)
    assert p["fast_rcnn"]["roi_head"] == 2000 * per_roi + 2000 * 512 * 49
    ratio = sum(p["rcnn"].values()) / sum(p["fast_rcnn"].values())
    assert 50 < ratio < 100
