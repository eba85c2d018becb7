"""Test-time speed of Fast R-CNN and R-CNN at 2,000 proposals per image, split by stage.

Also Fast R-CNN training images/s and peak memory. Both detectors are built the way the
package builds them (``build_fast_rcnn`` / ``RCNN``), with random weights (speed does not depend
on the values) and random SVMs/regressors for R-CNN, and run through the shared
``Detector.detect``, so post-processing is included and proposal time is not (proposals are
given). On CPU, R-CNN at 2,000 proposals takes minutes per image with VGG16, so it is timed on
``--rcnn-proposals`` (default 2,000 on CUDA, 100 on CPU) and scaled linearly to 2,000; the table
says which.

    python tools/bench_detectors.py --device cuda --backbones vgg16 efficientnet_lite0
    python tools/bench_detectors.py --device cpu --backbones efficientnet_lite0 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from detect.common.config import Config
from detect.models.detector import StageTimer
from detect.models.build import build_fast_rcnn
from detect.training.fast_rcnn_train import build_optimizer, fast_rcnn_loss
from detect.models.rcnn import RCNN
from detect.models.backbones import build_backbone


def _image_and_proposals(num: int, height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    xy = rng.uniform(0, [width - 24, height - 24], (num, 2))
    wh = rng.uniform(20, [width / 2, height / 2], (num, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [width, height])], axis=1).astype(np.float32)
    return image, boxes


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_detect(detector, image, proposals, repeats: int) -> dict[str, float]:
    detector.detect(image, proposals)  # warm-up (cuDNN autotune, allocator)
    timer = StageTimer(detector.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        detector.detect(image, proposals, timer=timer)
    if detector.device.type == "cuda":
        torch.cuda.synchronize()
    stages = timer.per_image(repeats)
    stages["total"] = (time.perf_counter() - t0) * 1e3 / repeats
    return stages


def _fast_rcnn(backbone: str, num_classes: int, svd: bool = False):
    cfg = Config()
    cfg.model.backbone, cfg.model.weights, cfg.model.freeze_at = backbone, "none", ""
    cfg.test.score_thresh = 0.0  # keep post-processing busy: every class survives the threshold
    model = build_fast_rcnn(cfg, [f"c{i}" for i in range(num_classes)])
    if svd:
        model.apply_svd(cfg.test.svd_fc6, cfg.test.svd_fc7)
    return model, cfg


def _rcnn(backbone: str, num_classes: int, crop_size: int):
    bb = build_backbone(backbone, weights="none", freeze_at="")
    d, d5 = bb.head_dim, bb.out_channels * bb.roi_size ** 2
    g = torch.Generator().manual_seed(0)
    return RCNN(backbone=bb, class_names=[f"c{i}" for i in range(num_classes)], crop_size=crop_size or bb.crop_size,
                svm_weight=torch.randn(num_classes, d, generator=g) * 0.01, svm_bias=torch.zeros(num_classes),
                feat_scale=1.0, bbox_weight=torch.randn(num_classes, d5, 4, generator=g) * 1e-4,
                bbox_bias=torch.zeros(num_classes, 4), bbox_target_mean=torch.zeros(num_classes, 4),
                bbox_target_std=torch.ones(num_classes, 4), score_thresh=0.0)


def _train_speed(model, device: torch.device, height: int, width: int, iters: int, amp: bool) -> tuple[float, float]:
    """Fast R-CNN training images/s at N=2 images, R=128 RoIs; and peak memory (MB)."""
    model.train().to(device)
    opt = build_optimizer(model, lr=1e-4, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(2, 3, height, width, device=device)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(128, 2, generator=g) * torch.tensor([width - 40.0, height - 40.0])
    rois = torch.cat([torch.arange(128).remainder(2)[:, None].float(), xy, xy + 32], dim=1).to(device)
    labels = torch.randint(0, model.num_classes + 1, (128,), generator=g).to(device)
    targets = torch.randn(128, 4, generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits, deltas = model(images, rois)
            losses = fast_rcnn_loss(logits.float(), deltas.float(), labels, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.eval()
    return 2 * iters / (time.perf_counter() - t0), _peak_mb(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbones", nargs="+", default=["vgg16", "efficientnet_lite0"])
    p.add_argument("--proposals", type=int, default=2000)
    p.add_argument("--rcnn-proposals", type=int, default=0, help="R-CNN proposals timed (0: 2000 on CUDA, 100 on CPU)")
    p.add_argument("--height", type=int, default=600, help="image height (the [FRCN] test scale)")
    p.add_argument("--width", type=int, default=800)
    p.add_argument("--classes", type=int, default=20, help="object classes (VOC: 20)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-iters", type=int, default=5)
    p.add_argument("--skip-rcnn", action="store_true")
    p.add_argument("--out", default="", help="write the figures as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    rcnn_n = args.rcnn_proposals or (args.proposals if device.type == "cuda" else 100)
    image, proposals = _image_and_proposals(args.proposals, args.height, args.width)
    rows = []
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
          f", image {args.height}x{args.width}, {args.proposals} proposals, {args.classes} classes")
    for name in args.backbones:
        model, _ = _fast_rcnn(name, args.classes)
        model.to(device).eval()
        frcn = _time_detect(model, image, proposals, args.repeats)
        row = {"backbone": name, "fast_rcnn_ms": frcn}
        if name in ("vgg16", "alexnet"):
            svd_model, _ = _fast_rcnn(name, args.classes, svd=True)
            row["fast_rcnn_svd_ms"] = _time_detect(svd_model.to(device).eval(), image, proposals, args.repeats)
            del svd_model
        row["train_images_per_s"], row["train_peak_mb"] = _train_speed(model, device, args.height, args.width,
                                                                       args.train_iters, amp=True)
        del model
        if not args.skip_rcnn:
            rcnn = _rcnn(name, args.classes, 0).to(device).eval()
            r = _time_detect(rcnn, image, proposals[:rcnn_n], max(1, args.repeats // 2))
            scale = args.proposals / rcnn_n
            row["rcnn_ms"] = {k: v * scale for k, v in r.items()}
            row["rcnn_measured_proposals"] = rcnn_n
            row["rcnn_over_fast_rcnn"] = row["rcnn_ms"]["total"] / frcn["total"]
            if "fast_rcnn_svd_ms" in row:
                row["rcnn_over_fast_rcnn_svd"] = row["rcnn_ms"]["total"] / row["fast_rcnn_svd_ms"]["total"]
            del rcnn
        rows.append(row)
        print(_format_row(row, args.proposals))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "args": vars(args), "rows": rows}, f, indent=2)


def _format_row(row: dict, n: int) -> str:
    def stages(d: dict) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in d.items() if k != "total") + f"; total {d['total']:.1f} ms"

    lines = [f"[{row['backbone']}]",
             f"  Fast R-CNN, {n} proposals: {stages(row['fast_rcnn_ms'])}"]
    if "fast_rcnn_svd_ms" in row:
        lines.append(f"  Fast R-CNN + SVD:          {stages(row['fast_rcnn_svd_ms'])}")
    lines.append(f"  Fast R-CNN training: {row['train_images_per_s']:.2f} images/s, peak {row['train_peak_mb']:.0f} MB")
    if "rcnn_ms" in row:
        scaled = "" if row["rcnn_measured_proposals"] == n else f" (timed on {row['rcnn_measured_proposals']}, scaled to {n})"
        lines.append(f"  R-CNN{scaled}: {stages(row['rcnn_ms'])}")
        ratio = f"  R-CNN / Fast R-CNN = {row['rcnn_over_fast_rcnn']:.0f}x"
        if "rcnn_over_fast_rcnn_svd" in row:
            ratio += f" ({row['rcnn_over_fast_rcnn_svd']:.0f}x against Fast R-CNN with SVD)"
        lines.append(ratio)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
