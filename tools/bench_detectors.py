"""Test-time speed of Fast R-CNN and R-CNN at 2,000 proposals per image, split by stage.

Also Fast R-CNN training images/s and peak memory. Both detectors are built the way the
package builds them (``build_fast_rcnn`` / ``RCNN``), with random weights (speed does not depend
on the values) and random SVMs/regressors for R-CNN, and run through the shared
``Detector.detect``, so post-processing is included and proposal time is not (proposals are
given). On CPU, R-CNN at 2,000 proposals takes minutes per image with VGG16, so it is timed on
``--rcnn-proposals`` (default 2,000 on CUDA, 100 on CPU) and scaled linearly to 2,000; the table
says which.

Each figure is the median of ``--repeats`` timed runs after ``--warmup`` untimed ones (cuDNN
autotuning, the allocator), with the per-stage medians beside it (stages are timed with a CUDA
synchronise at each boundary, so their sum is close to the total) and the peak memory of the
timed runs. On CUDA the detectors run under bf16 autocast, as ``detect eval`` does; the same
detector in float32 is timed beside it. "batched" is Fast R-CNN's network (body + RoI head, no
post-processing) on ``--batch-images`` images in one forward, as images/s, against the single-image
loop; R-CNN's throughput is images/s over the loop (its batch is already the 2,000 warps).

    python tools/bench_detectors.py --device cuda --backbones vgg16 efficientnet_lite0 --width 1000
    python tools/bench_detectors.py --device cpu --backbones efficientnet_lite0 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from detect.common.config import Config
from detect.common.runtime import autocast, peak_memory_mb, reset_peak_memory
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_detect(detector, image, proposals, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Per-stage medians (ms) of ``repeats`` runs after ``warmup``; "total" is the mean, "median"
    the median of the whole ``detect`` call, "peak_mb" the peak memory of the timed runs."""
    device = detector.device
    for _ in range(max(warmup, 1)):  # cuDNN autotune, allocator
        detector.detect(image, proposals)
    _sync(device)
    reset_peak_memory(device)
    runs, stage_runs = [], []
    for _ in range(repeats):
        timer = StageTimer(device)
        t0 = time.perf_counter()
        detector.detect(image, proposals, timer=timer)  # returns CPU tensors: synchronised
        _sync(device)
        runs.append((time.perf_counter() - t0) * 1e3)
        stage_runs.append(timer.totals_ms)
    stages = {k: statistics.median(s.get(k, 0.0) for s in stage_runs) for k in stage_runs[0]}
    stages["total"] = sum(runs) / len(runs)
    stages["median"] = statistics.median(runs)
    stages["peak_mb"] = peak_memory_mb(device)
    return stages


def _time_fp32(detector, image, proposals, repeats: int, warmup: int) -> dict[str, float]:
    """The same detector without autocast (float32; TF32 matmuls as torch's defaults allow)."""
    detector.amp = False
    try:
        return _time_detect(detector, image, proposals, repeats, warmup)
    finally:
        detector.amp = True


@torch.no_grad()
def _batched_images_per_s(model, device: torch.device, num_images: int, height: int, width: int,
                          proposals: np.ndarray, repeats: int, warmup: int) -> float:
    """Fast R-CNN's network on ``num_images`` images [N, 3, H, W] with all their RoIs in one
    forward (bf16 autocast on CUDA), images/s; no pre- or post-processing."""
    images = torch.randn(num_images, 3, height, width, device=device)
    boxes = torch.as_tensor(proposals, device=device)  # [R, 4]
    rois = torch.cat([torch.arange(num_images, device=device, dtype=torch.float32).repeat_interleave(len(boxes))[:, None],
                      boxes.repeat(num_images, 1)], dim=1)  # [N * R, 5]
    for _ in range(max(warmup, 1)):
        with autocast(device, True):
            model(images, rois)
    _sync(device)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with autocast(device, True):
            model(images, rois)
        _sync(device)
        runs.append(time.perf_counter() - t0)
    return num_images / statistics.median(runs)


FC_BACKBONES = ("vgg16", "alexnet")  # their own 4096-d fc6/fc7: --head-dim does not apply


def _fast_rcnn(backbone: str, num_classes: int, svd: bool = False, head_dim: int = 4096, scale: int = 0):
    cfg = Config()
    if scale:
        cfg.test.scale, cfg.test.max_size = scale, max(scale, cfg.test.max_size * scale // cfg.test.scale)
    cfg.model.backbone, cfg.model.weights, cfg.model.freeze_at = backbone, "none", ""
    if backbone not in FC_BACKBONES:
        cfg.model.head_dim = head_dim
    if backbone == "alexnet":
        cfg.model.roi_size = 6  # AlexNet's fc6 takes 6x6 pooled features (VGG16's 7x7, the default)
    cfg.test.score_thresh = 0.0  # keep post-processing busy: every class survives the threshold
    model = build_fast_rcnn(cfg, [f"c{i}" for i in range(num_classes)])
    if svd:
        model.apply_svd(cfg.test.svd_fc6, cfg.test.svd_fc7)
    return model, cfg


def _rcnn(backbone: str, num_classes: int, crop_size: int, head_dim: int = 4096):
    bb = build_backbone(backbone, weights="none", freeze_at="", head_dim=4096 if backbone in FC_BACKBONES else head_dim,
                        roi_size=6 if backbone == "alexnet" else 7)
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
    reset_peak_memory(device)

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
    return 2 * iters / (time.perf_counter() - t0), peak_memory_mb(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbones", nargs="+", default=["vgg16", "efficientnet_lite0"])
    p.add_argument("--proposals", type=int, default=2000)
    p.add_argument("--rcnn-proposals", type=int, default=0, help="R-CNN proposals timed (0: 2000 on CUDA, 100 on CPU)")
    p.add_argument("--height", type=int, default=600, help="image height (the [FRCN] test scale)")
    p.add_argument("--width", type=int, default=800)
    p.add_argument("--classes", type=int, default=20, help="object classes (VOC: 20)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--batch-images", type=int, default=4,
                   help="images per forward for the batched Fast R-CNN throughput (0: skip)")
    p.add_argument("--no-fp32", action="store_true", help="skip the float32 timings")
    p.add_argument("--head-dim", type=int, default=4096,
                   help="fc6/fc7 width of the conv backbones' heads (vgg16/alexnet keep their own 4096)")
    p.add_argument("--test-scale", type=int, default=0,
                   help="Fast R-CNN's test scale (shorter side; 0: the config default, [FRCN]'s 600)")
    p.add_argument("--crop-size", type=int, default=0, help="R-CNN warp size (0: the backbone's, 224 for VGG16)")
    p.add_argument("--svd-all", action="store_true",
                   help="time truncated SVD for every backbone (default: vgg16 and alexnet only)")
    p.add_argument("--train-iters", type=int, default=5)
    p.add_argument("--skip-rcnn", action="store_true")
    p.add_argument("--out", default="", help="write the figures as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    rcnn_n = args.rcnn_proposals or (args.proposals if device.type == "cuda" else 100)
    image, proposals = _image_and_proposals(args.proposals, args.height, args.width)
    rows, table = [], []
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
          f", image {args.height}x{args.width}, {args.proposals} proposals, {args.classes} classes")
    for name in args.backbones:
        model, _ = _fast_rcnn(name, args.classes, head_dim=args.head_dim, scale=args.test_scale)
        model.to(device).eval()
        frcn = _time_detect(model, image, proposals, args.repeats, args.warmup)
        row = {"backbone": name, "fast_rcnn_ms": frcn}
        if not args.no_fp32:
            row["fast_rcnn_fp32_ms"] = _time_fp32(model, image, proposals, args.repeats, args.warmup)
        if args.batch_images > 0:
            row["fast_rcnn_batched_images_per_s"] = _batched_images_per_s(
                model, device, args.batch_images, args.height, args.width, proposals, args.repeats, args.warmup)
            row["fast_rcnn_batch_images"] = args.batch_images
            row["fast_rcnn_loop_images_per_s"] = 1e3 / frcn["median"]
        if name in FC_BACKBONES or args.svd_all:
            svd_model, _ = _fast_rcnn(name, args.classes, svd=True, head_dim=args.head_dim, scale=args.test_scale)
            row["fast_rcnn_svd_ms"] = _time_detect(svd_model.to(device).eval(), image, proposals, args.repeats,
                                                   args.warmup)
            del svd_model
        row["train_images_per_s"], row["train_peak_mb"] = _train_speed(model, device, args.height, args.width,
                                                                       args.train_iters, amp=True)
        del model
        if not args.skip_rcnn:
            rcnn = _rcnn(name, args.classes, args.crop_size, head_dim=args.head_dim).to(device).eval()
            rcnn_repeats = max(1, args.repeats // 2)
            r = _time_detect(rcnn, image, proposals[:rcnn_n], rcnn_repeats, args.warmup)
            scale = args.proposals / rcnn_n
            row["rcnn_ms"] = {k: v * (scale if k != "peak_mb" else 1.0) for k, v in r.items()}
            if not args.no_fp32:
                r = _time_fp32(rcnn, image, proposals[:rcnn_n], rcnn_repeats, args.warmup)
                row["rcnn_fp32_ms"] = {k: v * (scale if k != "peak_mb" else 1.0) for k, v in r.items()}
            row["rcnn_images_per_s"] = 1e3 / row["rcnn_ms"]["median"]
            row["rcnn_measured_proposals"] = rcnn_n
            row["rcnn_over_fast_rcnn"] = row["rcnn_ms"]["median"] / frcn["median"]
            if "fast_rcnn_svd_ms" in row:
                row["rcnn_over_fast_rcnn_svd"] = row["rcnn_ms"]["median"] / row["fast_rcnn_svd_ms"]["median"]
            del rcnn
        rows.append(row)
        table += _format_row(row, args.proposals).splitlines()
        print(_format_row(row, args.proposals), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device) + (f": {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
                       "args": vars(args), "rows": rows, "table": table}, f, indent=2)


def _format_row(row: dict, n: int) -> str:
    def stages(d: dict) -> str:
        return (", ".join(f"{k} {v:.1f}" for k, v in d.items() if k not in ("total", "median", "peak_mb"))
                + f"; median {d['median']:.1f} ms, peak {d['peak_mb']:.0f} MB")

    lines = [f"[{row['backbone']}]",
             f"  Fast R-CNN, {n} proposals: {stages(row['fast_rcnn_ms'])}"]
    if "fast_rcnn_fp32_ms" in row:
        lines.append(f"  Fast R-CNN float32:        {stages(row['fast_rcnn_fp32_ms'])}")
    if "fast_rcnn_svd_ms" in row:
        lines.append(f"  Fast R-CNN + SVD:          {stages(row['fast_rcnn_svd_ms'])}")
    if "fast_rcnn_batched_images_per_s" in row:
        lines.append(f"  Fast R-CNN network, {row['fast_rcnn_batch_images']} images per forward: "
                     f"{row['fast_rcnn_batched_images_per_s']:.1f} images/s (one-image detect loop: "
                     f"{row['fast_rcnn_loop_images_per_s']:.1f} images/s)")
    lines.append(f"  Fast R-CNN training: {row['train_images_per_s']:.2f} images/s, peak {row['train_peak_mb']:.0f} MB")
    if "rcnn_ms" in row:
        scaled = "" if row["rcnn_measured_proposals"] == n else f" (timed on {row['rcnn_measured_proposals']}, scaled to {n})"
        lines.append(f"  R-CNN{scaled}: {stages(row['rcnn_ms'])}")
        if "rcnn_fp32_ms" in row:
            lines.append(f"  R-CNN float32: {stages(row['rcnn_fp32_ms'])}")
        ratio = f"  R-CNN / Fast R-CNN = {row['rcnn_over_fast_rcnn']:.0f}x"
        if "rcnn_over_fast_rcnn_svd" in row:
            ratio += f" ({row['rcnn_over_fast_rcnn_svd']:.0f}x against Fast R-CNN with SVD)"
        lines.append(ratio)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
