"""One function per ``detect`` subcommand (flags: ``detect.cli``): the wiring of the stages.

The only reader of the ``Config`` object (with ``detect.models.build``): it loads the config,
the dataset and its proposals, and passes plain values to the stage functions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

import cv2
import numpy as np
import torch

from detect.common.checkpoints import save_detector_checkpoint
from detect.common.config import Config, check_proposal_settings, load_config, save_config, to_dict
from detect.common.fileio import check_settings, read_json, write_json_atomic, write_settings
from detect.common.cpus import available_cores
from detect.common.runtime import (barrier, init_distributed, is_main_process, local_world_size,
                                   long_wait_group, rank_and_world, resolve_device, seed_everything)
from detect.data.datasets import Dataset, load_coco, load_dataset, read_class_names
from detect.data.images import find_images, read_image
from detect.data.synthetic import make_synthetic as write_synthetic
from detect.evaluation.bench import bench as bench_detectors, format_bench
from detect.evaluation.coco import evaluate_detections
from detect.evaluation.proposal_tuning import Grid, rankings, sample_records, tune_to_files
from detect.evaluation.recall import counted_gt, format_recall_table, proposal_recall, warn_if_low_recall
from detect.evaluation.run import evaluate_detector, print_metrics, run_detector, score_results_file
from detect.models.build import build_backbone_from, build_fast_rcnn, build_rcnn, load_detector
from detect.predict.batch import predict as predict_images
from detect.predict.outputs import write_recall_drawings
from detect.proposals.batch import DEFAULT_CHUNK_SIZE, generate_proposals, parse_shard
from detect.proposals.selective_search import first_proposals, selective_search
from detect.proposals.store import EXPORT_FORMATS, ProposalStore, export_proposals
from detect.report.figures import proposal_tuning as proposal_tuning_figure
from detect.report.sections import make_report
from detect.training.engine import step_lr
from detect.training.fast_rcnn_train import FastRCNNTrainData, build_optimizer, train_fast_rcnn
from detect.training.rcnn_train import FineTuneSettings, SVMSettings, train_rcnn
from detect.training.tensorboard_log import log_final_eval


def make_synthetic(args: argparse.Namespace) -> int:
    """``detect make-synthetic``: write the dataset and print what it holds."""
    train_json, val_json = write_synthetic(args.out, args.train, args.val, args.seed)
    for json_path in (train_json, val_json):
        dataset = load_coco(json_path)
        counts = np.bincount(np.concatenate([r.gt_classes[~r.gt_difficult] for r in dataset.records]),
                             minlength=dataset.num_classes + 1)
        per_class = ", ".join(f"{name} {n}" for name, n in zip(dataset.class_names, counts[1:]))
        print(f"{json_path}: {len(dataset)} images, {per_class} "
              f"({dataset.report.num_difficult} mostly occluded, ignored)")
    return 0


def _store_for(path: str, dataset: Dataset) -> ProposalStore | None:
    return ProposalStore(path).check_dataset(dataset) if path else None


def _dataset_spec(args: argparse.Namespace) -> dict:
    return {"format": args.format, "path": args.data, "images": args.images, "split": args.split,
            "classes": read_class_names(args.classes) if args.classes else []}


def _load_spec(spec: dict, classes: list[str] | None = None) -> Dataset:
    """The dataset of a ``DatasetConfig`` dict; ``classes`` (the detector's) before the spec's."""
    return load_dataset(spec["format"], spec["path"], spec["images"], spec["split"],
                        classes=classes or spec.get("classes") or None)


def propose(args: argparse.Namespace) -> int:
    """``detect propose``: a store for a dataset (``--data``) or for files (``--input``, ids as
    ``detect predict`` gives them). Hidden: ``DETECT_PROPOSAL_CHUNK`` sets the images per chunk
    file. Under torchrun each rank computes its shard and rank 0 merges after a barrier."""
    cfg = load_config(args.config, args.overrides)
    if args.export and args.export[0] not in EXPORT_FORMATS:  # before hours of work, not after
        raise ValueError(f"--export: format must be one of {list(EXPORT_FORMATS)}, got {args.export[0]!r}")
    if args.input and args.data:
        raise ValueError("give either --data (a dataset) or --input (image files), not both")
    dataset = None
    if args.input:
        items = [(i + 1, str(path)) for i, path in enumerate(find_images(args.input))]
    elif args.data:
        dataset = _load_spec(_dataset_spec(args))
        items = [(r.image_id, r.file_name) for r in dataset.records]
    else:
        raise ValueError("give --data (a dataset) or --input (image files, folders or globs)")
    shard = parse_shard(args.shard)
    workers = args.workers
    distributed = False
    rank, world_size = rank_and_world()
    if shard is None and world_size > 1:  # under torchrun
        shard = (rank, world_size)
        if workers <= 0:  # share the node's cores between its ranks
            workers = max(1, available_cores() // local_world_size())
        try:  # gloo (no device): the ranks only meet at the barrier below
            distributed = init_distributed()
        except Exception as e:  # noqa: BLE001 -- then the last shard to finish merges
            print(f"no process group ({type(e).__name__}: {e}); proposals: each rank computes its shard "
                  "and the last to finish merges", file=sys.stderr)
    run = {"settings": to_dict(cfg.proposals), "workers": workers,
           "chunk_size": int(os.environ.get("DETECT_PROPOSAL_CHUNK", DEFAULT_CHUNK_SIZE))}
    store = generate_proposals(items, args.out, shard=shard, merge=not distributed, **run)
    if distributed:
        barrier()  # every rank's chunks are on disk
        if shard[0] == 0:
            store = generate_proposals(items, args.out, **run)
        torch.distributed.destroy_process_group()
    if store is None:
        return 0
    save_config(cfg, store.path / "config.yaml")
    num_boxes = store.meta["num_boxes"]
    print(f"{store.path}: {len(store)} images, {num_boxes} proposals "
          f"({num_boxes / max(len(store), 1):.0f} per image), {len(store.meta['failures'])} failed")
    if dataset is not None:
        warn_if_low_recall(dataset, store, cfg.proposals.top_k, _dataset_spec(args))
    if args.export:
        fmt, path = args.export
        print(f"wrote {path}: {export_proposals(store, fmt, path)} images as {fmt} precomputed proposals")
    return 0


def recall(args: argparse.Namespace) -> int:
    """``detect recall``: ``proposal_recall`` of a store, with "num_images", "num_gt" and drawings."""
    if not args.data:
        raise ValueError("detect recall needs --data (the dataset the proposals were made for)")
    dataset = _load_spec(_dataset_spec(args))
    store = ProposalStore(args.proposals)
    result = proposal_recall(dataset, store, progress=True)
    num_gt = sum(len(counted_gt(r)[0]) for r in dataset.records)
    avg = float(np.mean([store.num_boxes(r.image_id) for r in dataset.records])) if len(dataset) else 0.0
    summary = {**result, "num_images": len(dataset), "num_gt": num_gt, "avg_proposals_per_image": avg}
    print(f"{store.path} on {dataset.name}: {len(dataset)} images, {num_gt} GT boxes, "
          f"{avg:.1f} proposals per image ({store.meta.get('mode')} mode)")
    print(format_recall_table(result))
    warn_if_low_recall(dataset, store, args.top_k, _dataset_spec(args))
    if args.out:
        write_json_atomic(args.out, summary)
        print(f"wrote {args.out}")
    if args.visualize:
        vis_dir = Path(args.vis_dir or Path(args.out or ".").parent / "recall_vis")
        written = write_recall_drawings(dataset.records, store.get, vis_dir, args.visualize, top_k=args.top_k)
        print(f"wrote {len(written)} drawing(s) of each ground-truth box's best proposal to {vis_dir}")
    return 0


def tune_proposals(args: argparse.Namespace) -> int:
    """``detect tune-proposals``: ``detect.evaluation.proposal_tuning.tune_to_files``."""
    if not args.data:
        raise ValueError("detect tune-proposals needs --data (a training split with boxes)")
    cfg = load_config(args.config, args.overrides)
    grid = Grid(*map(tuple, (args.modes, args.resizes, args.k_scales, args.min_sizes)), rankings(args.nms_ious))
    options = ("num_images", "seed", "target_recall", "target_iou", "max_boxes", "probe_images", "exhaustive")
    records = _load_spec(_dataset_spec(args)).records
    result = tune_to_files(records, args.out, base=to_dict(cfg.proposals), grid=grid, cache_dir=args.cache,
                           data_spec=_dataset_spec(args), figure=proposal_tuning_figure,
                           **{key: getattr(args, key) for key in options})
    if args.visualize:  # the chosen settings' proposals on the first sampled images, as `detect recall`
        by_id, search = {r.image_id: r for r in records}, check_proposal_settings(result["settings"])
        written = write_recall_drawings(
            sample_records(records, args.num_images, args.seed),
            lambda image_id: selective_search(read_image(by_id[image_id].file_name), **search),
            Path(f"{args.out}_vis"), args.visualize, top_k=result["settings"]["top_k"])
        print(f"wrote {len(written)} drawings of the chosen settings' proposals into {args.out}_vis/")
    return 0


def train(args: argparse.Namespace) -> int:
    """``detect train``: train into ``--output-dir``, then evaluate on the val split."""
    cfg = load_config(args.config, args.overrides)
    output_dir = Path(args.output_dir)
    check_settings(output_dir / "run.json", {"detector": cfg.detector},
                   hint="training another detector there would overwrite its model_final.pt; "
                        "choose another --output-dir")
    device = resolve_device(args.device)
    init_distributed(device)
    if is_main_process():
        write_settings(output_dir / "run.json", {"detector": cfg.detector})
        save_config(cfg, output_dir / "config.yaml")
    t0 = time.perf_counter()
    checkpoint = train_from_config(cfg, output_dir, device=device, resume=args.resume)
    seconds, train_time = time.perf_counter() - t0, output_dir / "train_time.json"
    if is_main_process():  # this session's seconds: a resumed run adds up
        before = read_json(train_time)["seconds"] if train_time.is_file() else 0.0
        write_json_atomic(train_time, {"seconds": before + seconds})
        print(f"trained {cfg.detector}: {checkpoint}")
    val = cfg.data.val
    if not val.path:
        print("no data.val.path in the config: skipping evaluation")
        return 0
    metrics = _evaluate_checkpoint(checkpoint, to_dict(val), cfg.data.val_proposals, output_dir, device=device)
    if metrics:  # rank 0: the final AP in TensorBoard too, at the last iteration
        last_iteration = cfg.rcnn.ft_max_iter if cfg.detector == "rcnn" else cfg.train.max_iter
        log_final_eval(output_dir / "tb", last_iteration, metrics)
    return 0


def train_from_config(cfg: Config, output_dir: str | Path, *, device: torch.device = torch.device("cpu"),
                      resume: bool = False, progress: bool = True) -> Path:
    """Train ``cfg.detector`` into ``output_dir``; returns the path of its ``model_final.pt``."""
    output_dir = Path(output_dir)
    dataset = _load_spec(to_dict(cfg.data.train))
    if not cfg.data.train_proposals:
        raise ValueError("data.train_proposals is empty: compute a proposal store with `detect propose`")
    store = ProposalStore(cfg.data.train_proposals).check_dataset(dataset)
    if is_main_process():
        warn_if_low_recall(dataset, store, cfg.proposals.top_k, to_dict(cfg.data.train))

    def get_proposals(image_id: int) -> np.ndarray:  # [P, 4] xyxy, selective search's best first
        return first_proposals(store.get(image_id), cfg.proposals.top_k)

    if cfg.detector == "fast_rcnn":
        return _train_fast_rcnn(cfg, dataset, get_proposals, output_dir, device=device, resume=resume)
    return _train_rcnn(cfg, dataset, get_proposals, output_dir, device=device, resume=resume, progress=progress)


def _train_fast_rcnn(cfg: Config, dataset: Dataset, get_proposals, output_dir: Path, *,
                     device: torch.device, resume: bool) -> Path:
    t = cfg.train
    rank, world_size = rank_and_world()
    seed_everything(t.seed)  # the same initial weights whatever the number of GPUs
    model = build_fast_rcnn(cfg, dataset.class_names, dataset.category_ids).to(device)
    seed_everything(t.seed + rank)  # dropout differs per GPU; the data sampler takes rank explicitly
    data = FastRCNNTrainData(
        records=dataset.records, get_proposals=get_proposals, pixel_mean=model.pixel_mean,
        pixel_std=model.pixel_std, images_per_batch=t.images_per_batch, rois_per_image=t.rois_per_image,
        scales=t.scales, max_size=t.max_size, flip=t.flip, fg_fraction=t.fg_fraction, fg_iou=t.fg_iou,
        bg_iou_low=t.bg_iou_low, bg_iou_high=t.bg_iou_high, bbox_std=t.bbox_std, seed=t.seed,
        rank=rank, world_size=world_size, use_difficult=t.use_difficult)
    skipped = train_fast_rcnn(
        model, data, output_dir,
        optimizer=build_optimizer(model, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay),
        lr_at=step_lr(t.lr, t.steps, t.gamma, t.warmup_iters, t.warmup_factor), max_iter=t.max_iter,
        checkpoint_period=t.checkpoint_period, log_period=t.log_period, amp=t.amp,
        bbox_loss_weight=t.bbox_loss_weight, num_workers=t.num_workers, device=device, resume=resume,
        eval_fn=_periodic_eval_fn(cfg), eval_period=t.eval_period)
    path = output_dir / "model_final.pt"
    if rank == 0:
        save_detector_checkpoint(path, kind="fast_rcnn", config=to_dict(cfg), class_names=dataset.class_names,
                                 category_ids=dataset.category_ids, state_dict=model.state_dict(),
                                 extra={"skipped_images": skipped})
    barrier()
    return path


def _periodic_eval_fn(cfg: Config):
    """``train.eval_period``'s evaluation on val -> {"AP", "AP50", "skipped_images"}; None if off or no val."""
    if cfg.train.eval_period <= 0:
        return None
    if not cfg.data.val.path:
        print(f"train.eval_period {cfg.train.eval_period}: no data.val.path in the config, so no periodic "
              "evaluation", file=sys.stderr)
        return None
    val = _load_spec(to_dict(cfg.data.val))
    store = _store_for(cfg.data.val_proposals, val)

    def eval_fn(model, iteration: int) -> dict:
        skipped: list[dict] = []
        detections = run_detector(model, val.records, store=store, progress=False, skipped=skipped)
        metrics = evaluate_detections(val, detections)
        return {"AP": metrics["AP"], "AP50": metrics["AP50"], "skipped_images": len(skipped)}

    return eval_fn


def _train_rcnn(cfg: Config, dataset: Dataset, get_proposals, output_dir: Path, *,
                device: torch.device, resume: bool, progress: bool = True) -> Path:
    r, t = cfg.rcnn, cfg.train
    idle_group = long_wait_group()  # other ranks wait in it while rank 0 trains the SVMs
    seed_everything(t.seed)  # the same initial weights whatever the number of GPUs
    backbone = build_backbone_from(cfg)
    seed_everything(t.seed + rank_and_world()[0])  # dropout differs per GPU during fine-tuning
    # Each stage's settings are the rcnn section's ft_* / svm_* fields, plus what train shares.
    shared = {name: getattr(t, name) for name in ("flip", "seed", "checkpoint_period", "log_period")}
    finetune = FineTuneSettings(**{f.name: getattr(r, f"ft_{f.name}") for f in fields(FineTuneSettings)
                                   if f.name not in shared}, **shared)
    svm = SVMSettings(**{f.name: getattr(r, f"svm_{f.name}") for f in fields(SVMSettings)})
    fingerprint = {**to_dict(cfg.data.train), "proposals": cfg.data.train_proposals,
                   "top_k": cfg.proposals.top_k, "num_images": len(dataset), "model": to_dict(cfg.model)}
    extra = train_rcnn(backbone, dataset.records, get_proposals, output_dir, num_classes=dataset.num_classes,
                       crop_size=r.crop_size or backbone.crop_size, context_pad=r.context_pad,
                       finetune=finetune, svm=svm, bbox_lambda=r.bbox_ridge_lambda, bbox_min_iou=r.bbox_min_iou,
                       cache_features=r.cache_features, feature_batch_size=r.feature_batch_size, amp=t.amp,
                       fingerprint=fingerprint, resume=resume, use_difficult=t.use_difficult, device=device,
                       progress=progress)
    path = output_dir / "model_final.pt"
    if extra is not None:  # rank 0
        extra = {k: torch.from_numpy(np.asarray(v)) for k, v in extra.items()}
        detector = build_rcnn(cfg, dataset.class_names, extra, dataset.category_ids, backbone=backbone)
        save_detector_checkpoint(path, kind="rcnn", config=to_dict(cfg), class_names=dataset.class_names,
                                 category_ids=dataset.category_ids, state_dict=detector.state_dict(), extra=extra)
    barrier(idle_group)  # a 7-day timeout: the other ranks wait here while rank 0 trains the SVMs
    return path


def evaluate(args: argparse.Namespace) -> int:
    """``detect eval``: score a results file (``--results``) or a trained detector (``--checkpoint``)."""
    if bool(args.results) == bool(args.checkpoint):
        raise ValueError("give exactly one of --results (a COCO results JSON to score) or "
                         "--checkpoint (a trained detector to run and score)")
    if not args.data:
        raise ValueError(f"--data is required with {'--checkpoint' if args.checkpoint else '--results'}: "
                         "the ground-truth dataset to score against")
    output_dir = Path(args.output_dir or Path(args.checkpoint or args.results).parent)
    if args.checkpoint:
        device = resolve_device(args.device)
        init_distributed(device)
        _evaluate_checkpoint(args.checkpoint, _dataset_spec(args), args.proposals, output_dir, device=device,
                             limit=args.limit, metric=args.metric, ablation=_ablation(args))
        return 0

    metrics = score_results_file(_load_spec(_dataset_spec(args)), Path(args.results), output_dir, limit=args.limit)
    print_metrics(metrics, args.metric)
    return 0


def _ablation(args: argparse.Namespace) -> list[str]:
    """The test-time ablation flags of ``detect eval`` / ``detect bench`` as config overrides."""
    if args.top_k < -1:
        raise ValueError(f"--top-k must be >= 0 (0 = all), got {args.top_k}")
    overrides = ["test.box_regression=false"] if args.no_box_regression else []
    if args.top_k >= 0:
        overrides.append(f"proposals.top_k={args.top_k}")
    if args.svd != "config":
        overrides.append(f"test.svd={'true' if args.svd == 'on' else 'false'}")
    return overrides


def _load_ablated(checkpoint: str | Path, device, ablation: list[str] | None):
    """``load_detector`` with the ablation's overrides (None: as trained)."""
    detector = load_detector(checkpoint, device, overrides=ablation or [])
    if any(o.startswith("test.svd=true") for o in ablation or []) and detector.kind != "fast_rcnn":
        raise ValueError(f"{checkpoint}: --svd applies to Fast R-CNN only, this is {detector.kind}")
    return detector


def _evaluate_checkpoint(checkpoint: str | Path, data_spec: dict, proposals: str, output_dir: Path, *,
                         device: torch.device, limit: int = 0, metric: str = "coco",
                         ablation: list[str] | None = None) -> dict:
    """Evaluate a checkpoint on a dataset (mapped to its classes); print and write metrics."""
    detector = _load_ablated(checkpoint, device, ablation)
    if data_spec.get("classes") and list(data_spec["classes"]) != detector.class_names:
        raise ValueError(f"{checkpoint}: trained on classes {detector.class_names}, but the dataset's "
                         f"classes are given as {list(data_spec['classes'])}")
    if data_spec["format"] == "voc":  # VOC objects are mapped to the trained classes by name
        dataset = _load_spec(data_spec, detector.class_names)
        data_spec = {**data_spec, "classes": dataset.class_names}  # the report's grid loads it alike
    else:
        dataset = _load_spec(data_spec)
    if limit:
        dataset = Dataset(dataset.name, dataset.records[:limit], dataset.class_names, dataset.category_ids)
    store = _store_for(proposals, dataset)
    if detector.class_names != dataset.class_names:
        raise ValueError(f"{checkpoint}: trained on classes {detector.class_names}, but {data_spec['path']} "
                         f"has {dataset.class_names}")
    tt = output_dir / "train_time.json"
    metrics = evaluate_detector(detector, dataset, output_dir, store=store, data_spec=data_spec,
                                train_time_s=read_json(tt)["seconds"] if tt.is_file() else None)
    if metrics:
        print_metrics(metrics, metric)
        print(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'detections.json'}")
    return metrics


def bench(args: argparse.Namespace) -> int:
    """``detect bench``: two or more detectors interleaved image by image; writes bench.json."""
    if len(args.checkpoints) < 2:
        raise ValueError("give two or more checkpoints to compare")
    if not args.data:
        raise ValueError("--data is required: the images to time the detectors on")
    spec = _dataset_spec(args)
    dataset = _load_spec(spec)
    records = dataset.records[:args.limit] if args.limit > 0 else dataset.records
    store = _store_for(args.proposals, dataset)
    device = resolve_device(args.device)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: the libraries' defaults), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    detectors = [_load_ablated(c, device, _ablation(args)) for c in args.checkpoints]
    names = [Path(c).parent.name or str(c) for c in args.checkpoints]
    if len(set(names)) < len(names):
        names = [str(c) for c in args.checkpoints]
    result = bench_detectors(detectors, names, records, get_proposals=store.get if store is not None else None,
                             warmup=args.warmup, num_resamples=args.resamples)
    result.update(checkpoints=[str(c) for c in args.checkpoints], data=spec)
    print(format_bench(result))
    write_json_atomic(Path(args.output), result)
    print(f"wrote {args.output}")
    return 0


def predict(args: argparse.Namespace) -> int:
    """``detect predict``: ``detect.predict.batch.predict`` with a checkpoint (torchrun: a share per rank)."""
    rank, world_size = rank_and_world()
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    stat = checkpoint.stat()
    detector = load_detector(checkpoint, args.device)  # '' = cuda if available, else cpu
    summary = predict_images(
        detector, args.input, args.output_dir, score_threshold=args.score_threshold,
        proposal_settings=detector.proposal_settings, workers=args.workers, proposal_store=args.proposals or None,
        visualize=args.visualize, rank=rank, world_size=world_size,
        model_fingerprint=f"{checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    print(f"detect predict: {summary.num_images} image(s), {summary.num_detections} detection(s) "
          f">= {args.score_threshold}, {summary.num_errors} error(s) (see errors.json); "
          f"{summary.images_per_s:.2f} images/s on {summary.device}; outputs in {args.output_dir}",
          file=sys.stderr)
    return 0


def compare(args: argparse.Namespace) -> int:
    """``detect compare``: report.md, report.html and viewer.html of evaluated runs."""
    md_path, html_path = make_report([Path(r) for r in args.runs], Path(args.output_dir),
                                     data=_dataset_spec(args) if args.data else None, num_grid_images=args.grid_images,
                                     bench=args.bench or None, proposals=args.proposals)
    print(f"wrote {md_path} and {html_path}")
    return 0
