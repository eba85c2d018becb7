"""Load a trained detector, run it over a dataset, score it: ``detect eval --checkpoint``.

Both detectors go through the same code here: the same proposals (a store, or selective
search timed as the "proposals" stage), the same ``Detector.detect`` (hence the same
post-processing) and the same COCO evaluation. A run directory ends up with:

- ``detections.json``: COCO results of the evaluated images;
- ``metrics.json``: COCO metrics, per-class AP, PR curves at IoU 0.5, per-stage test time in
  ms per image, images/s, peak memory, parameter count, device, training time, proposal
  recall and the dataset it was measured on (the contract ``detect compare`` reads; see
  ``detect.report``);
- ``coco_eval.log``: what pycocotools printed.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import torch

from detect.data import Dataset, ImageRecord, load_dataset, read_image
from detect.detector import Detections, Detector, StageTimer
from detect.engine import dist_info, load_checkpoint, resolve_device, DETECTOR_FORMAT
from detect.io import read_json, write_json_atomic

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def load_detector(checkpoint: str | Path, device: str | torch.device | None = None) -> Detector:
    """Rebuild the detector saved in ``checkpoint`` (either kind), in eval mode on ``device``."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("format") != DETECTOR_FORMAT:
        raise ValueError(f"{checkpoint}: a training-state checkpoint, not a trained detector "
                         "(use the run's model_final.pt)")
    kind = ckpt.get("kind")
    if kind == "fast_rcnn":
        from detect.fast_rcnn import build_from_checkpoint
    elif kind == "rcnn":
        from detect.rcnn import build_from_checkpoint
    else:
        raise ValueError(f"{checkpoint}: unknown detector kind {kind!r}")
    try:
        detector = build_from_checkpoint(ckpt)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"{checkpoint}: does not match a {kind} model ({str(e).splitlines()[0]})") from None
    from detect.config import from_dict
    from detect.proposals import proposal_settings

    cfg = from_dict(ckpt["config"], f"{checkpoint} (config)")
    detector.proposal_settings = proposal_settings(cfg.proposals)
    detector.category_ids = list(ckpt["category_ids"])
    device = resolve_device(str(device) if device is not None else "")
    return detector.to(device).eval()


def run_detector(detector: Detector, records: list[ImageRecord], *, store=None,
                 timer: StageTimer | None = None, progress: bool = True) -> dict[int, Detections]:
    """Detect on every record (this rank's share under torchrun); returns {image_id: Detections}.

    Proposals come from ``store`` (a ``ProposalStore``) or, without one, from selective search
    with the detector's own settings (timed as the "proposals" stage). Unreadable images are
    reported and get no detections.
    """
    from tqdm import tqdm

    timer = timer or StageTimer(detector.device)
    rank, world = dist_info()
    mine = records[rank::world]
    results: dict[int, Detections] = {}
    for rec in tqdm(mine, desc="detect", unit="img", disable=not progress or rank != 0, dynamic_ncols=True):
        image = read_image(rec.file_name)
        proposals = None
        if store is not None:
            with timer("proposal_load"):
                proposals = store.get(rec.image_id)
        results[rec.image_id] = detector.detect(image, proposals, timer=timer)
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    return results


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak: CUDA's allocator stats, or on Linux the process's RSS high-water mark
    (``/proc/self/clear_refs``), so that a process that evaluates two runs reports each its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated, or the peak resident memory since ``_reset_peak_memory`` (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # whole-process peak


def evaluate_detector(detector: Detector, dataset: Dataset, output_dir: str | Path, *, store=None,
                      name: str = "", data_spec: dict | None = None, train_time_s: float | None = None,
                      progress: bool = True) -> dict:
    """Run ``detector`` over ``dataset``, write detections.json and metrics.json, return metrics."""
    from detect.evaluation import coco_results, evaluate_detections

    output_dir = Path(output_dir)
    device = detector.device
    _reset_peak_memory(device)
    timer = StageTimer(device)
    t0 = time.perf_counter()
    detections = run_detector(detector, dataset.records, store=store, timer=timer, progress=progress)
    elapsed = time.perf_counter() - t0
    if dist_info()[0] != 0:
        return {}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "detections.json", coco_results(dataset, detections), indent=None)
    m = evaluate_detections(dataset, detections, log_path=output_dir / "coco_eval.log")
    recall = None
    if store is not None:
        from detect.proposals import proposal_recall

        recall = proposal_recall(dataset, store)
    metrics = {
        "detector": detector.kind, "name": name or output_dir.name,
        "backbone": getattr(detector, "backbone_name", ""),
        "device": _device_name(device),
        "num_parameters": sum(p.numel() for p in detector.parameters()),
        "num_images": len(dataset), "num_detections": m["num_detections"],
        "coco": {k: m[k] for k in COCO_KEYS},
        "per_class_AP": m["per_class_AP"], "per_class_AP50": m["per_class_AP50"],
        "pr_curve_50": m["pr_curve_50"],
        "timing_ms_per_image": timer.per_image(len(dataset)),
        "images_per_second": len(dataset) / max(elapsed, 1e-9),
        "peak_memory_mb": _peak_memory_mb(device),
        "train_time_s": train_time_s,
        "proposal_recall": recall,
        "data": data_spec or {},
    }
    write_json_atomic(output_dir / "metrics.json", metrics)
    return metrics


def print_metrics(metrics: dict) -> None:
    from detect.evaluation import format_metrics_table

    flat = dict(metrics["coco"], per_class_AP=metrics["per_class_AP"], per_class_AP50=metrics["per_class_AP50"],
                num_images=metrics["num_images"], num_detections=metrics["num_detections"])
    print(format_metrics_table(flat))
    stages = ", ".join(f"{k} {v:.1f}" for k, v in metrics["timing_ms_per_image"].items())
    print(f"test time (ms/image): {stages}; {metrics['images_per_second']:.2f} images/s on {metrics['device']}")


def _open_store(path: str):
    if not path:
        return None
    from detect.proposals import ProposalStore

    return ProposalStore(path)


def _evaluate_split(checkpoint: str | Path, data_spec: dict, proposals: str, output_dir: Path, *,
                    device: torch.device, limit: int = 0) -> dict:
    """Load the dataset, its proposals and the detector; evaluate; print and write metrics."""
    dataset = load_dataset(data_spec["format"], data_spec["path"], data_spec["images"], data_spec["split"])
    if limit:
        dataset = Dataset(dataset.name, dataset.records[:limit], dataset.class_names, dataset.category_ids)
    store = _open_store(proposals)
    if store is not None:
        store.check_dataset(dataset)
    detector = load_detector(checkpoint, device)
    if detector.class_names != dataset.class_names:
        raise ValueError(f"{checkpoint}: trained on classes {detector.class_names}, but {data_spec['path']} "
                         f"has {dataset.class_names}")
    tt = output_dir / "train_time.json"
    metrics = evaluate_detector(detector, dataset, output_dir, store=store, name=output_dir.name,
                                data_spec=data_spec,
                                train_time_s=read_json(tt)["seconds"] if tt.is_file() else None)
    if metrics:
        print_metrics(metrics)
        print(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'detections.json'}")
    return metrics


def evaluate_after_training(cfg, checkpoint: Path, output_dir: Path, *, device: torch.device) -> dict:
    """``detect train`` ends here: score the final detector on the config's val split."""
    val = cfg.data.val
    if not val.path:
        print("no data.val.path in the config: skipping evaluation")
        return {}
    spec = {"format": val.format, "path": val.path, "images": val.images, "split": val.split}
    return _evaluate_split(checkpoint, spec, cfg.data.val_proposals, output_dir, device=device)


def evaluate_checkpoint(args) -> int:
    """``detect eval --checkpoint CKPT --data ... [--proposals STORE] [--output-dir DIR]``."""
    from detect.engine import init_distributed

    device = resolve_device(args.device)
    init_distributed(device)
    if not args.data:
        raise ValueError("--data is required with --checkpoint")
    spec = {"format": args.format, "path": args.data, "images": args.images, "split": args.split}
    output_dir = Path(args.output_dir or Path(args.checkpoint).parent)
    _evaluate_split(args.checkpoint, spec, args.proposals, output_dir, device=device, limit=args.limit)
    return 0
