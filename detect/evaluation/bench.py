"""``detect bench``: time two or more detectors so that machine noise cancels.

Timed one after the other, whatever else the machine does decides the ratio. Here they run
**interleaved, image by image**, in one process (image 1 with A, then B, image 2 with A, then
B, ...), on the same images with the same proposals; the first ``warmup`` images are not
counted. The summary gives medians, p10/p90 and the ratio of medians with a paired bootstrap 95%
interval over images (one resample for all detectors). Selective search (or the store read)
runs once per image as the shared "proposals" stage; end to end is proposals + detector, the
wait in ``detect predict``.
"""

from __future__ import annotations

import copy
import platform
import time
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torchvision
from tqdm import tqdm

from detect.common.runtime import device_name
from detect.data.datasets import ImageRecord
from detect.data.images import read_image
from detect.evaluation.flops import detector_flops, paper_flops
from detect.evaluation.run import timing_lists
from detect.models.detector import Detector, StageTimer
from detect.proposals.selective_search import selective_search

PROPOSALS = "proposals"  # the shared stage: selective search (or the store read), once per image
DETECTOR_TOTAL = "detector"  # sum of a detector's own stages
END_TO_END = "end_to_end"  # proposals + detector


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
    """Run every detector on every record, interleaved; per-image stage times after warm-up.

    Proposals, once per image for all: ``get_proposals(image_id)`` (a store), else selective
    search with the first detector's settings. Returns {"proposals": [ms], "num_proposals": [R],
    "detectors": [{stage: [ms]}]} per counted image (``warmup`` onwards).
    """
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


def bench(detectors: Sequence[Detector], names: Sequence[str], records: Sequence[ImageRecord], *,
          get_proposals: Callable[[int], np.ndarray] | None = None, warmup: int = 3, num_resamples: int = 2000) -> dict:
    """``run_interleaved`` + ``bench_summary`` + the environment: bench.json's content."""
    timings = run_interleaved(detectors, records, get_proposals=get_proposals, warmup=warmup)
    result = bench_summary(timings, names, [d.kind for d in detectors], num_resamples=num_resamples)
    # FLOPs at the bench's median image size and proposal count (machine-independent).
    image_hw = (int(np.median([r.height for r in records[warmup:]])), int(np.median([r.width for r in records[warmup:]])))
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
