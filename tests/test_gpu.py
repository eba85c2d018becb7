"""CUDA against the CPU: the ops and detectors give the same numbers on the GPU.

Marked ``gpu`` and skipped without CUDA; ``tools/gpu_check.sh`` runs them (``pytest -m gpu``).
Tolerances: the CUDA kernels sum in another order and cuDNN may pick TF32 convolutions, so
float32 results agree to ~1e-3 relative, not bit for bit; bf16 autocast to ~1e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import nms, roi_align, roi_pool

from detect.common.config import Config
from detect.models.build import build_fast_rcnn
from detect.models.rcnn import warp_regions

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")


def _boxes(num: int, size: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g) * (size - 20)
    wh = torch.rand(num, 2, generator=g) * (size / 2) + 4
    return torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)  # [R, 4] xyxy


def test_nms_on_cuda_keeps_the_cpu_indices():
    boxes = _boxes(500, 200.0)
    scores = torch.rand(500, generator=torch.Generator().manual_seed(1))  # distinct: no tie order
    keep_cpu = nms(boxes, scores, 0.5)
    keep_cuda = nms(boxes.to(CUDA), scores.to(CUDA), 0.5).cpu()
    assert 0 < len(keep_cpu) < 500
    assert torch.equal(keep_cpu, keep_cuda)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_roi_ops_on_cuda_match_the_cpu(op):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 32, 40, generator=g)
    boxes = _boxes(64, 300.0)
    rois = torch.cat([(torch.arange(64) % 2).float()[:, None], boxes], dim=1)  # [R, 5]
    if op == "roi_align":
        def run(f, r):
            return roi_align(f, r, 7, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
    else:
        def run(f, r):
            return roi_pool(f, r, 7, spatial_scale=1 / 16)
    cpu = run(features, rois)
    cuda = run(features.to(CUDA), rois.to(CUDA)).cpu()
    assert cpu.abs().sum() > 0
    torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-5)


def _tiny_fast_rcnn(amp: bool):
    cfg = Config()
    cfg.model.backbone, cfg.model.weights, cfg.model.freeze_at = "efficientnet_lite0", "none", ""
    cfg.model.head_dim, cfg.model.roi_size, cfg.model.dropout = 64, 3, 0.0
    cfg.test.scale, cfg.test.max_size, cfg.test.score_thresh = 96, 160, 0.0
    cfg.train.amp = amp
    torch.manual_seed(0)
    return build_fast_rcnn(cfg, ["a", "b", "c"]).eval()


def _image_and_proposals():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (96, 144, 3), dtype=np.uint8)
    return image, _boxes(40, 90.0).numpy()


def test_fast_rcnn_scores_on_cuda_match_the_cpu_in_float32():
    model = _tiny_fast_rcnn(amp=False)
    image, proposals = _image_and_proposals()
    boxes = torch.from_numpy(proposals)
    cpu = model.score_proposals(image, boxes)
    model.to(CUDA)
    cuda = model.score_proposals(image, boxes.to(CUDA))
    torch.testing.assert_close(cuda.scores.cpu(), cpu.scores, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(cuda.deltas.cpu(), cpu.deltas, rtol=1e-3, atol=1e-4)


def test_bf16_inference_gives_float32_scores_close_to_float32():
    image, proposals = _image_and_proposals()
    boxes = torch.from_numpy(proposals).to(CUDA)
    model = _tiny_fast_rcnn(amp=True).to(CUDA)
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    bf16 = model.score_proposals(image, boxes)
    model.amp = False
    fp32 = model.score_proposals(image, boxes)
    assert bf16.scores.dtype == torch.float32 and bf16.deltas.dtype == torch.float32
    torch.testing.assert_close(bf16.scores, fp32.scores, rtol=5e-2, atol=1e-2)
    dets = model.detect(image, proposals)
    assert dets.scores.dtype == torch.float32 and dets.boxes.dtype == torch.float32


def test_rcnn_warp_regions_on_cuda_match_the_cpu():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 120, 160, generator=g)
    boxes = torch.cat([_boxes(50, 110.0), torch.tensor([[-10.0, -5.0, 170.0, 130.0]])])  # one past the edges
    fill = torch.tensor([0.5, 0.4, 0.3])
    cpu = warp_regions(image, boxes, crop_size=32, context_pad=4, fill=fill)
    cuda = warp_regions(image.to(CUDA), boxes.to(CUDA), crop_size=32, context_pad=4, fill=fill).cpu()
    assert cuda.shape == (51, 3, 32, 32)
    torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-5)
