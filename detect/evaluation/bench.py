"""``detect bench``: time two or more detectors so that machine noise cancels; their FLOPs beside.

Timed one after the other, whatever else the machine does decides the ratio. Here they run
**interleaved, image by image**, in one process (image 1 with A, then B, image 2 with A, then
B, ...), on the same images with the same proposals; the first ``warmup`` images are not
counted. The summary gives medians, p10/p90 and the ratio of medians with a paired bootstrap 95%
interval over images (one resample for all detectors). Selective search (or the store read)
runs once per image as the shared "proposals" stage; end to end is proposals + detector, the
wait in ``detect predict``.

FLOPs per image and stage, machine-independent and deterministic, are counted by
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add) on **meta**
tensors, where only shapes flow; per-RoI work (R-CNN's CNN on one warp, Fast R-CNN's head on one
pooled RoI) is counted once and multiplied by the number of proposals. Added by formula, unseen
by the counter: RoI pooling, ``R * C * S * S * k`` with k = 1 comparison per output for max
pooling (a lower bound) or 32 for RoI align (2 x 2 samples of 4 bilinear taps), either under
0.1% of VGG16's fc6; R-CNN's warp, 4 bilinear taps per output value (8 FLOPs).
"""

from __future__ import annotations

import copy
import functools
import platform
import time
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from detect.common.runtime import device_name
from detect.data.datasets import ImageRecord
from detect.data.images import read_image
from detect.evaluation.run import timing_lists
from detect.models.backbones import build_backbone
from detect.models.detector import Detector, StageTimer
from detect.models.fast_rcnn import FastRCNN, resize_scale
from detect.models.rcnn import RCNN, RegionNet
from detect.proposals.selective_search import selective_search

PROPOSALS = "proposals"  # the shared stage: selective search (or the store read), once per image
DETECTOR_TOTAL = "detector"  # sum of a detector's own stages
END_TO_END = "end_to_end"  # proposals + detector
ROI_FLOPS_PER_OUTPUT = {"roi_pool": 1, "roi_align": 32}  # see the module docstring
WARP_FLOPS_PER_OUTPUT = 8  # bilinear: 4 taps x (multiply + add)
PAPER_NUM_PROPOSALS = 2000
PAPER_FAST_RCNN_INPUT = (600, 1000)  # [FRCN] shorter side 600, longer side capped at 1000
PAPER_RCNN_CROP = 224  # VGG16's input, which our configs use; [RCNN]'s 227 is AlexNet's
PAPER_NUM_CLASSES = 20  # PASCAL VOC
PAPER_SETTINGS = (f"VGG16 without weights, {PAPER_NUM_PROPOSALS} proposals, {PAPER_NUM_CLASSES} classes; Fast R-CNN "
                  f"on a {PAPER_FAST_RCNN_INPUT[0]} x {PAPER_FAST_RCNN_INPUT[1]} input, R-CNN on {PAPER_RCNN_CROP} x "
                  f"{PAPER_RCNN_CROP} warps (VGG16's input; the R-CNN paper's 227 is AlexNet's)")


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, p10 and p90 (numpy's linear interpolation) and the count of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    p10, p50, p90 = np.percentile(v, [10, 50, 90]) if v.size else (np.nan,) * 3
    return {"median": float(p50), "p10": float(p10), "p90": float(p90), "n": int(v.size)}


def ratio_of_medians(numer: Sequence[float], denom: Sequence[float], *, num_resamples: int = 2000,
                     seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """median(numer) / median(denom) with the paired bootstrap interval of the module docstring
    (``numer[i]`` and ``denom[i]``: the times of image i). Returns ratio, lo, hi."""
    a, b = np.asarray(numer, dtype=np.float64), np.asarray(denom, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired timings differ in length: {a.size} and {b.size}")
    if a.size == 0:
        return {"ratio": float("nan"), "lo": float("nan"), "hi": float("nan")}
    ratio = float(np.median(a) / np.median(b))
    idx = np.random.default_rng(seed).integers(0, a.size, size=(num_resamples, a.size))
    boot = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.percentile(boot, [100 * alpha, 100 * (1 - alpha)])
    return {"ratio": ratio, "lo": float(lo), "hi": float(hi)}


def environment() -> dict:
    """What the timings depend on besides the code: threads, device, versions."""
    return {"torch_threads": torch.get_num_threads(), "opencv_threads": cv2.getNumThreads(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "opencv": cv2.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine()}


def run_interleaved(detectors: Sequence[Detector], records: Sequence[ImageRecord], *,
                    get_proposals: Callable[[int], np.ndarray] | None = None, warmup: int = 3,
                    progress: bool = True) -> dict:
    """The module docstring's interleaved run; proposals from ``get_proposals(image_id)``, else selective
    search at the first detector's settings. Returns {"proposals": [ms], "num_proposals": [R],
    "detectors": [{stage: [ms]}]} per counted image (``warmup`` onwards)."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if len(records) <= warmup:
        raise ValueError(f"{len(records)} image(s) but warm-up takes {warmup}: nothing left to time")
    settings = detectors[0].proposal_settings
    proposal_ms: list[float] = []
    num_proposals: list[int] = []
    per_image: list[list[dict[str, float]]] = []  # per counted image: each detector's {stage: ms}
    for i, rec in enumerate(tqdm(records, desc="bench", unit="img", disable=not progress, dynamic_ncols=True)):
        image = read_image(rec.file_name)
        t0 = time.perf_counter()
        proposals = get_proposals(rec.image_id) if get_proposals is not None else selective_search(image, **settings)
        prop_ms = (time.perf_counter() - t0) * 1e3
        stages = []
        for det in detectors:
            timer = StageTimer(det.device)  # a fresh timer per call: its totals are this image's
            det.detect(image, proposals, timer=timer)
            stages.append(dict(timer.totals_ms))
        if i < warmup:
            continue
        proposal_ms.append(prop_ms)
        num_proposals.append(int(np.asarray(proposals).reshape(-1, 4).shape[0]))
        per_image.append(stages)
    lists = [timing_lists([st[j] for st in per_image])["timing_ms_per_image_list"] for j in range(len(detectors))]
    return {PROPOSALS: proposal_ms, "num_proposals": num_proposals, "detectors": lists}


def reference_index(kinds: Sequence[str]) -> int:
    """The detector ratios are taken against: Fast R-CNN when R-CNN is also there, else the first."""
    return list(kinds).index("fast_rcnn") if "rcnn" in kinds and "fast_rcnn" in kinds else 0


def bench_summary(timings: dict, names: Sequence[str], kinds: Sequence[str], *, num_resamples: int = 2000,
                  seed: int = 0) -> dict:
    """Median/p10/p90 of ``run_interleaved``'s timings per detector and stage, detector-only and end to
    end, and each detector's ratio of medians to the reference (> 1: slower), with intervals."""
    prop = np.asarray(timings[PROPOSALS], dtype=np.float64)
    totals, out_dets = [], []  # totals: per detector, {DETECTOR_TOTAL, END_TO_END: ms per image}
    for name, kind, stages in zip(names, kinds, timings["detectors"]):
        det_total = sum((np.asarray(v, dtype=np.float64) for v in stages.values()), np.zeros_like(prop))
        totals.append({DETECTOR_TOTAL: det_total, END_TO_END: det_total + prop})
        out_dets.append({"name": name, "kind": kind, "stages": {s: summarize(v) for s, v in stages.items()},
                         **{key: summarize(v) for key, v in totals[-1].items()},
                         "per_image_ms": {s: list(map(float, v)) for s, v in stages.items()}})
    ref = reference_index(kinds)
    for i, d in enumerate(out_dets):
        if i != ref:
            d["ratio_to_reference"] = {
                key: ratio_of_medians(v, totals[ref][key], num_resamples=num_resamples, seed=seed)
                for key, v in totals[i].items()}
    return {"reference": names[ref], PROPOSALS: summarize(prop), "proposals_per_image_ms": list(map(float, prop)),
            "num_images": int(prop.size), "detectors": out_dets, "num_resamples": num_resamples, "seed": seed}


def count_flops(module: nn.Module, *inputs_shapes: tuple[int, ...]) -> int:
    """FLOPs of one ``module(*inputs)`` call with inputs of these shapes, counted on meta
    tensors (``module`` is copied to the meta device unless it already lives there)."""
    if next(module.parameters(), torch.empty(0, device="meta")).device.type != "meta":
        module = copy.deepcopy(module).to("meta")
    inputs = [torch.empty(shape, device="meta") for shape in inputs_shapes]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


class _RoIHead(nn.Module):
    """Fast R-CNN's per-RoI work after pooling: head, then the two sibling layers."""

    def __init__(self, head: nn.Module, cls_score: nn.Module, bbox_pred: nn.Module):
        super().__init__()
        self.head, self.cls_score, self.bbox_pred = head, cls_score, bbox_pred

    def forward(self, pooled):
        x = self.head(pooled)
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_flops(*, body: nn.Module, roi_head: nn.Module, roi_size: int, input_hw: tuple[int, int],
                    num_proposals: int, roi_op: str = "roi_pool") -> dict[str, int]:
    """{"backbone", "roi_head"} FLOPs of Fast R-CNN on a network input of ``input_hw`` (``body`` on meta)."""
    with torch.no_grad():  # the body's output channels, from its forward on meta
        c = int(body(torch.empty((1, 3, *input_hw), device="meta")).shape[1])
    s = roi_size
    per_roi = count_flops(roi_head, (1, c, s, s))
    pooling = num_proposals * c * s * s * ROI_FLOPS_PER_OUTPUT[roi_op]
    return {"backbone": count_flops(body, (1, 3, *input_hw)), "roi_head": num_proposals * per_roi + pooling}


def rcnn_flops(*, net: nn.Module, crop_size: int, num_proposals: int, head_dim: int, pool5_dim: int,
               num_classes: int) -> dict[str, int]:
    """{"warp", "features", "svm", "bbox_reg"} FLOPs of R-CNN on ``num_proposals`` warps."""
    r, k = num_proposals, num_classes
    return {"warp": r * 3 * crop_size * crop_size * WARP_FLOPS_PER_OUTPUT,
            "features": r * count_flops(net, (1, 3, crop_size, crop_size)),
            "svm": r * 2 * head_dim * k,
            "bbox_reg": r * 2 * pool5_dim * 4 * k}


def detector_flops(detector: Detector, image_hw: tuple[int, int], num_proposals: int) -> dict[str, int]:
    """FLOPs per stage of ``detector`` at its settings on one image of ``image_hw`` (original
    pixels) with ``num_proposals`` proposals (cut to its ``proposal_top_k`` when set)."""
    r = min(num_proposals, detector.proposal_top_k) if detector.proposal_top_k > 0 else num_proposals
    if isinstance(detector, FastRCNN):  # multi-scale test: the backbone runs at every scale
        h, w = image_hw
        body = copy.deepcopy(detector.body).to("meta")
        roi_head = _RoIHead(detector.head, detector.cls_score, detector.bbox_pred)
        total: dict[str, int] = {}
        for i, size in enumerate(detector.test_scales):
            scale = resize_scale(h, w, size, detector.test_max_size)
            input_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
            stages = fast_rcnn_flops(body=body, roi_head=roi_head, roi_size=detector.roi_size, input_hw=input_hw,
                                     num_proposals=r if i == 0 else 0, roi_op=detector.roi_op)
            total = {k: total.get(k, 0) + v for k, v in stages.items()}  # each RoI on one scale only
        return total
    if isinstance(detector, RCNN):
        return rcnn_flops(net=detector.net, crop_size=detector.crop_size, num_proposals=r,
                          head_dim=detector.svm_weight.shape[1], pool5_dim=detector.bbox_weight.shape[1],
                          num_classes=detector.num_classes)
    raise ValueError(f"FLOP count: unknown detector kind {detector.kind!r}")


@functools.lru_cache(maxsize=1)  # deterministic; building VGG16 on meta takes seconds
def paper_flops() -> dict:
    """Both detectors at ``PAPER_SETTINGS`` (VGG16 built on meta): {"settings", "fast_rcnn":
    {stage: FLOPs}, "rcnn": {stage: FLOPs}, "rcnn_over_fast_rcnn"}. Cached: copy it to change it."""
    with torch.device("meta"):
        bb = build_backbone("vgg16", weights="none", head_dim=4096, roi_size=7)
        k = PAPER_NUM_CLASSES
        roi_head = _RoIHead(bb.head, nn.Linear(bb.head_dim, k + 1), nn.Linear(bb.head_dim, 4 * k))
        net = RegionNet(body=bb.body, head=bb.head, roi_size=bb.roi_size)
    fast = fast_rcnn_flops(body=bb.body, roi_head=roi_head, roi_size=bb.roi_size, input_hw=PAPER_FAST_RCNN_INPUT,
                           num_proposals=PAPER_NUM_PROPOSALS)
    slow = rcnn_flops(net=net, crop_size=PAPER_RCNN_CROP, num_proposals=PAPER_NUM_PROPOSALS, head_dim=bb.head_dim,
                      pool5_dim=bb.out_channels * bb.roi_size ** 2, num_classes=k)
    return {"settings": PAPER_SETTINGS, "fast_rcnn": fast, "rcnn": slow,
            "rcnn_over_fast_rcnn": sum(slow.values()) / sum(fast.values())}


def bench(detectors: Sequence[Detector], names: Sequence[str], records: Sequence[ImageRecord], *,
          get_proposals: Callable[[int], np.ndarray] | None = None, warmup: int = 3, num_resamples: int = 2000) -> dict:
    """``run_interleaved`` + ``bench_summary`` + the environment: bench.json's content."""
    timings = run_interleaved(detectors, records, get_proposals=get_proposals, warmup=warmup)
    result = bench_summary(timings, names, [d.kind for d in detectors], num_resamples=num_resamples)
    # FLOPs at the bench's median image size and proposal count (machine-independent).
    counted = records[warmup:]
    image_hw = (int(np.median([r.height for r in counted])), int(np.median([r.width for r in counted])))
    num_props = int(np.median(timings["num_proposals"]))
    ref = reference_index([d.kind for d in detectors])
    flops = [detector_flops(d, image_hw, num_props) for d in detectors]
    for entry, f, det in zip(result["detectors"], flops, detectors):
        entry["test_settings"] = {"box_regression": det.box_regression, "proposal_top_k": det.proposal_top_k}
        entry.update(flops=f, flops_total=sum(f.values()),
                     flops_ratio_to_reference=sum(f.values()) / max(sum(flops[ref].values()), 1))
    result.update(flops_image_hw=list(image_hw), flops_num_proposals=num_props,
                  paper_flops=copy.deepcopy(paper_flops()), warmup=warmup,
                  proposal_source="store" if get_proposals is not None else "selective_search",
                  device=device_name(detectors[0].device), environment=environment())
    return result


def ratio_text(r: dict) -> str:
    """A ``ratio_of_medians`` result as "1.23x (95% CI 1.10-1.40)"."""
    return f"{r['ratio']:.2f}x (95% CI {r['lo']:.2f}-{r['hi']:.2f})"


def format_bench(result: dict) -> str:
    """A plain-text table of a bench result (what ``detect bench`` prints)."""
    lines = [f"{result['num_images']} image(s) after {result['warmup']} warm-up, proposals from "
             f"{result['proposal_source']}, on {result['device']}; ms per image, median [p10, p90]"]
    p = result[PROPOSALS]
    lines.append(f"  proposals (shared): {p['median']:.1f} [{p['p10']:.1f}, {p['p90']:.1f}]")
    for d in result["detectors"]:
        lines.append(f"{d['name']} ({d['kind']}):")
        for s, v in list(d["stages"].items()) + [(DETECTOR_TOTAL, d[DETECTOR_TOTAL]), (END_TO_END, d[END_TO_END])]:
            lines.append(f"  {s}: {v['median']:.1f} [{v['p10']:.1f}, {v['p90']:.1f}]")
        for key, r in d.get("ratio_to_reference", {}).items():
            lines.append(f"  {key} time / {result['reference']}: {ratio_text(r)}")
        if "flops_total" in d:
            lines.append(f"  GFLOPs per image: {d['flops_total'] / 1e9:.2f} "
                         f"({d['flops_ratio_to_reference']:.2f}x {result['reference']})")
    env = result["environment"]
    lines.append(f"threads: torch {env['torch_threads']}, opencv {env['opencv_threads']}; torch {env['torch']}, "
                 f"torchvision {env['torchvision']}, opencv {env['opencv']}, numpy {env['numpy']}")
    return "\n".join(lines)
