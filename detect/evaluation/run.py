"""Run a detector over a dataset and score it: ``detect eval --checkpoint`` and ``detect train``.

Both detectors go through the same code here: the same proposals (a store, or selective
search timed as the "proposals" stage), the same ``Detector.detect`` (hence the same
post-processing) and the same COCO evaluation. A run directory ends up with:

- ``detections.json``: COCO results of the evaluated images;
- ``metrics.json``: COCO metrics, per-class AP, the unreadable images skipped (``skipped_images``), PR curves at IoU 0.5, per-stage test time in
  ms per image, images/s, peak memory, parameter count, device, training time, proposal
  recall and the dataset it was measured on (the contract ``detect compare`` reads; see
  ``detect.report.runs``);
- ``coco_eval.log``: what pycocotools printed.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from detect.common.fileio import write_json_atomic
from detect.common.runtime import device_name, peak_memory_mb, rank_and_world, reset_peak_memory
from detect.data.datasets import Dataset, ImageRecord
from detect.data.images import ImageReadError, read_image
from detect.evaluation.coco import COCO_KEYS, coco_results, evaluate_detections, format_metrics_table
from detect.evaluation.recall import proposal_recall
from detect.models.detector import Detections, Detector, StageTimer


def run_detector(detector: Detector, records: list[ImageRecord], *, store=None,
                 timer: StageTimer | None = None, progress: bool = True,
                 skipped: list[dict] | None = None) -> dict[int, Detections]:
    """Detect on every record (this rank's share under torchrun); returns {image_id: Detections}.

    Proposals come from ``store`` (a ``ProposalStore``) or, without one, from selective search
    with the detector's own settings (timed as the "proposals" stage). An unreadable image gets
    no detections (it still counts in the evaluation), a warning naming it, and an entry
    ``{"file", "reason"}`` appended to ``skipped`` (every rank's, on every rank). No rank
    raises for one, so the ranks stay in step for the final gather.
    """
    timer = timer or StageTimer(detector.device)
    rank, world = rank_and_world()
    mine = records[rank::world]
    results: dict[int, Detections] = {}
    unreadable: list[dict] = []
    for rec in tqdm(mine, desc="detect", unit="img", disable=not progress or rank != 0, dynamic_ncols=True):
        try:
            image = read_image(rec.file_name)
        except ImageReadError as e:
            warnings.warn(f"evaluation: no detections for an unreadable image: {e}")
            unreadable.append({"file": e.path, "reason": e.reason})
            results[rec.image_id] = Detections.empty()
            continue
        proposals = None
        if store is not None:
            with timer("proposal_load"):
                proposals = store.get(rec.image_id)
        results[rec.image_id] = detector.detect(image, proposals, timer=timer)
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (results, unreadable))
        results = {k: v for part, _ in gathered for k, v in part.items()}
        unreadable = [entry for _, part in gathered for entry in part]
    if skipped is not None:
        skipped.extend(sorted(unreadable, key=lambda e: e["file"]))
    return results


def evaluate_detector(detector: Detector, dataset: Dataset, output_dir: str | Path, *, store=None,
                      name: str = "", data_spec: dict | None = None, train_time_s: float | None = None,
                      progress: bool = True) -> dict:
    """Run ``detector`` over ``dataset``, write detections.json and metrics.json, return metrics."""
    output_dir = Path(output_dir)
    device = detector.device
    reset_peak_memory(device)
    timer = StageTimer(device)
    t0 = time.perf_counter()
    skipped: list[dict] = []
    detections = run_detector(detector, dataset.records, store=store, timer=timer, progress=progress,
                              skipped=skipped)
    elapsed = time.perf_counter() - t0
    if rank_and_world()[0] != 0:
        return {}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "detections.json", coco_results(dataset, detections), indent=None)
    m = evaluate_detections(dataset, detections, log_path=output_dir / "coco_eval.log")
    recall = None
    if store is not None:
        recall = proposal_recall(dataset, store)
    metrics = {
        "detector": detector.kind, "name": name or output_dir.name,
        "backbone": detector.backbone_name,
        "device": device_name(device),
        "num_parameters": sum(p.numel() for p in detector.parameters()),
        "num_images": len(dataset), "num_detections": m["num_detections"],
        "coco": {k: m[k] for k in COCO_KEYS},
        "per_class_AP": m["per_class_AP"], "per_class_AP50": m["per_class_AP50"],
        "pr_curve_50": m["pr_curve_50"],
        "timing_ms_per_image": timer.per_image(len(dataset)),
        "images_per_second": len(dataset) / max(elapsed, 1e-9),
        "peak_memory_mb": peak_memory_mb(device),
        "train_time_s": train_time_s,
        "proposal_recall": recall,
        "data": data_spec or {},
        "skipped_images": skipped,  # unreadable images, scored as having no detections
    }
    write_json_atomic(output_dir / "metrics.json", metrics)
    return metrics


def print_metrics(metrics: dict) -> None:
    flat = dict(metrics["coco"], per_class_AP=metrics["per_class_AP"], per_class_AP50=metrics["per_class_AP50"],
                num_images=metrics["num_images"], num_detections=metrics["num_detections"])
    print(format_metrics_table(flat))
    stages = ", ".join(f"{k} {v:.1f}" for k, v in metrics["timing_ms_per_image"].items())
    print(f"test time (ms/image): {stages}; {metrics['images_per_second']:.2f} images/s on {metrics['device']}")
    if metrics.get("skipped_images"):
        print(f"skipped {len(metrics['skipped_images'])} unreadable image(s), scored with no detections: "
              + ", ".join(e["file"] for e in metrics["skipped_images"][:5]))
