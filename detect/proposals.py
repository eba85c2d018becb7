"""Selective-search proposals: one image, a whole dataset (parallel, resumable, sharded), recall.

- ``selective_search(image, ...)``: OpenCV's selective search ([SS], ``cv2.ximgproc``) on one
  uint8 RGB image -> float32 [R, 4] xyxy boxes in original pixels, as [RCNN] used it: resize
  to 500 px wide, "fast" mode, drop duplicates and boxes under 20 px a side.
- ``generate_proposals(items, out_dir, ...)``: a process pool over many images, writing a
  ``ProposalStore`` (format: ``detect.proposal_store``). Work goes into ``<out>.partial/`` as
  chunks of ``chunk_size`` images in input order (chunk k = items[k*256:(k+1)*256]), each file
  written atomically; a re-run skips finished chunks, and when all exist they are merged into
  the store (built in a scratch folder, then renamed). A killed and re-run job gives a store
  byte-identical to an uninterrupted one; so does a job split into shards (``shard=(i, N)``
  computes chunks with k % N == i).
- ``proposal_recall(dataset, store)``: recall at IoU 0.5 and 0.7, average recall over IoU
  0.5:0.95 and (M)ABO at several numbers of proposals per image.
- ``cli_propose`` / ``cli_recall``: ``detect propose`` and ``detect recall``.

Determinism: OpenCV ranks regions with C ``rand()`` (``rank = rand() * level``), whose state
is process-wide and advances with every call, so the same image proposed twice in one process
comes back in two orders (and ``top_k`` keeps two different sets). ``selective_search`` seeds
libc's generator (``srand(1)``, glibc's start-up seed) right before each run, under a lock, so
the boxes depend only on the image and the settings. On a platform whose C library cannot be
reached through ctypes (Windows), the order may vary between runs.
"""

from __future__ import annotations

import ctypes
import glob
import math
import multiprocessing
import os
import shutil
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
from tqdm import tqdm

from detect import __version__
from detect.data import IMAGE_EXTENSIONS, ImageReadError, read_image
from detect.io import atomic_path, read_json, write_json_atomic
from detect.proposal_store import ProposalStore, dataset_fingerprint, write_store

MODES = {  # our name -> OpenCV's switch
    "fast": "switchToSelectiveSearchFast",  # [RCNN]: 2 colour spaces x 3 k's x 2 strategies
    "quality": "switchToSelectiveSearchQuality",  # [SS] quality: 5 colour spaces x 5 k's x 4 strategies
    "single": "switchToSingleStrategy",  # one colour space, one k, one strategy
}
RESIZE_SIDES = ("width", "longer", "shorter")
SETTINGS_KEYS = ("mode", "resize", "resize_side", "min_size", "top_k")  # = ProposalConfig fields
DEFAULT_CHUNK_SIZE = 256  # images per chunk file of a run in progress (DETECT_PROPOSAL_CHUNK)
RECALL_TOP_KS = (100, 300, 1000, 2000)
MAX_ELONGATION = 4  # the resized longer side is at most 4 x resize (extreme aspect ratios)
RANK_SEED = 1  # srand() seed before each run; 1 is glibc's default, as in a fresh process

try:
    _srand = ctypes.CDLL(None).srand
except (OSError, AttributeError, TypeError):  # no C library reachable this way (Windows)
    _srand = None
_rand_lock = threading.Lock()  # rand() is process-wide: one selective search at a time per process


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------

def selective_search(image: np.ndarray, *, mode: str = "fast", resize: int = 500,
                     resize_side: str = "width", min_size: int = 20, top_k: int = 2000) -> np.ndarray:
    """Selective-search boxes of one image: float32 [R, 4] xyxy in pixels of ``image``.

    ``image`` is uint8 RGB [H, W, 3] (``detect.data.read_image``). It is resized so that
    ``resize_side`` ("width", "longer" or "shorter") is ``resize`` pixels ([RCNN]: width 500;
    0 = no resize), proposed on in ``mode`` ("fast" [RCNN], "quality" [SS] or "single"), and
    the boxes are scaled back to the original pixels (the resized longer side is capped at
    ``MAX_ELONGATION`` x ``resize``, which only matters beyond 4:1 aspect ratios). Exact
    duplicates are dropped (the first one is kept, so selective search's ranking is preserved),
    then boxes with a side under ``min_size`` original pixels ([RCNN] code: 20), then all but
    the first ``top_k`` (0 = keep all). A tiny image may give no box at all: shape [0, 4].
    Deterministic (see the module docstring).
    """
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0):
        desc = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"selective_search needs a uint8 RGB image [H, W, 3], got {desc}")
    if mode not in MODES:
        raise ValueError(f"selective_search: mode must be one of {sorted(MODES)}, got {mode!r}")
    height, width = image.shape[:2]
    if min(height, width) < min_size:  # every box would be dropped: skip the work
        return np.zeros((0, 4), dtype=np.float32)
    small = _resize_for_proposals(image, resize, resize_side)  # [h, w, 3] RGB
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))  # OpenCV wants BGR
    getattr(ss, MODES[mode])()
    with _rand_lock:
        if _srand is not None:
            _srand(RANK_SEED)
        rects = np.asarray(ss.process(), dtype=np.int64).reshape(-1, 4)  # [R, 4] (x, y, w, h) in `small`

    _, first = np.unique(rects, axis=0, return_index=True)
    rects = rects[np.sort(first)]  # [R, 4] duplicates dropped, ranking kept
    scale_x = width / small.shape[1]
    scale_y = height / small.shape[0]
    boxes = np.empty(rects.shape, dtype=np.float64)  # [R, 4] xyxy original pixels
    boxes[:, 0] = rects[:, 0] * scale_x
    boxes[:, 1] = rects[:, 1] * scale_y
    boxes[:, 2] = (rects[:, 0] + rects[:, 2]) * scale_x
    boxes[:, 3] = (rects[:, 1] + rects[:, 3]) * scale_y
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)
    boxes = boxes[keep]
    if top_k > 0:
        boxes = boxes[:top_k]
    return boxes.astype(np.float32)  # [R, 4]


def _resize_for_proposals(image: np.ndarray, resize: int, resize_side: str) -> np.ndarray:
    """Resize so that ``resize_side`` is ``resize`` pixels (0: unchanged); aspect kept.

    Small images are enlarged too, as [RCNN] did (MATLAB ``imresize(im, [NaN 500])``).
    """
    if resize_side not in RESIZE_SIDES:
        raise ValueError(f"selective_search: resize_side must be one of {RESIZE_SIDES}, got {resize_side!r}")
    if resize < 0:
        raise ValueError(f"selective_search: resize must be >= 0, got {resize}")
    height, width = image.shape[:2]
    side = {"width": width, "longer": max(height, width), "shorter": min(height, width)}[resize_side]
    if resize == 0 or side == resize:
        return image
    # The longer side is capped at MAX_ELONGATION x resize, so that a sliver (say 2 x 700 px)
    # is not blown up to 500 x 175000 px to make its width 500.
    scale = min(resize / side, MAX_ELONGATION * resize / max(height, width))
    new_width = max(1, round(width * scale))
    new_height = max(1, round(height * scale))
    # INTER_AREA averages when shrinking (anti-aliased, like MATLAB's imresize in [RCNN]).
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_width, new_height), interpolation=interpolation)


def proposal_settings(cfg) -> dict:
    """The ``selective_search`` keyword arguments of a ``detect.config.ProposalConfig``."""
    return {key: getattr(cfg, key) for key in SETTINGS_KEYS}


def _check_settings(settings: dict) -> dict:
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    missing = [k for k in SETTINGS_KEYS if k not in settings]
    if unknown or missing:
        raise ValueError(f"proposal settings: unknown keys {unknown}, missing keys {missing} "
                         f"(expected {list(SETTINGS_KEYS)}, see proposal_settings)")
    if settings["mode"] not in MODES:
        raise ValueError(f"proposal settings: mode must be one of {sorted(MODES)}, got {settings['mode']!r}")
    if settings["resize_side"] not in RESIZE_SIDES:
        raise ValueError(f"proposal settings: resize_side must be one of {RESIZE_SIDES}, "
                         f"got {settings['resize_side']!r}")
    for key in ("resize", "min_size", "top_k"):
        if isinstance(settings[key], bool) or not isinstance(settings[key], int) or settings[key] < 0:
            raise ValueError(f"proposal settings: {key} must be an integer >= 0, got {settings[key]!r}")
    return {key: settings[key] for key in SETTINGS_KEYS}


# ---------------------------------------------------------------------------------------------
# Many images: chunks, workers, shards, merge
# ---------------------------------------------------------------------------------------------

def generate_proposals(items: list[tuple[int, str]], out_dir: str | os.PathLike, *, settings: dict,
                       workers: int = 0, shard: tuple[int, int] | None = None, progress: bool = True,
                       chunk_size: int = DEFAULT_CHUNK_SIZE, merge: bool = True) -> ProposalStore | None:
    """Selective search on every ``(image_id, path)`` of ``items``; write the store ``out_dir``.

    ``settings`` are ``selective_search``'s keyword arguments (``proposal_settings(cfg)``).
    ``workers`` processes (0 = all available cores; 1 = in this process). An image that cannot
    be read or proposed gets 0 boxes and is listed in ``meta.json`` "failures"; the run goes on
    (delete the store to retry them). If every image fails, no store is written (ValueError).
    With ``shard=(i, N)`` only chunks k with k % N == i are computed. When every chunk of the
    run exists (and ``merge``), they are merged into the store and the partial folder removed;
    returns the store, or None when chunks are still missing (other shards' work). If
    ``out_dir`` already holds a store of the same images and settings, it is returned as is.
    """
    out = Path(out_dir)
    settings = _check_settings(settings)
    items = [(int(image_id), str(path)) for image_id, path in items]
    ids, counts = np.unique(np.array([i for i, _ in items], dtype=np.int64), return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"proposals for {out}: image ids listed twice: {ids[counts > 1][:5].tolist()}")
    if chunk_size < 1:
        raise ValueError(f"proposals: chunk_size must be >= 1, got {chunk_size}")
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"proposals: shard must be i/N with 0 <= i < N, got {shard[0]}/{shard[1]}")
    meta = {**settings, "code_version": __version__, "opencv_version": cv2.__version__,
            "dataset_fingerprint": dataset_fingerprint(items)}
    if out.exists():
        return _existing_store(out, meta, len(items))

    partial = Path(f"{out}.partial")
    _start_or_check_job(partial, {**meta, "num_images": len(items), "chunk_size": chunk_size})
    num_chunks = math.ceil(len(items) / chunk_size)
    mine = [k for k in range(num_chunks) if shard is None or k % shard[1] == shard[0]]
    todo = [k for k in mine if not _chunk_path(partial, k).is_file()]
    if todo and len(todo) < len(mine):
        print(f"proposals: resuming {partial}: {len(mine) - len(todo)} of {len(mine)} chunks already done",
              file=sys.stderr)
    desc = "proposals" if shard is None else f"proposals {shard[0]}/{shard[1]}"
    _compute_chunks(items, todo, partial, settings, workers=workers, chunk_size=chunk_size,
                    progress=progress, desc=desc)

    missing = sum(not _chunk_path(partial, k).is_file() for k in range(num_chunks))
    if missing and merge:
        print(f"proposals: this shard is done; {missing} of {num_chunks} chunks in {partial} are other "
              f"shards' work. The last shard to finish merges them into {out} (or re-run without "
              f"--shard once all shards are done).", file=sys.stderr)
    if missing or not merge:
        return None
    return _merge_chunks(items, partial, out, meta, num_chunks=num_chunks, chunk_size=chunk_size)


def _existing_store(out: Path, meta: dict, num_images: int) -> ProposalStore:
    store = ProposalStore(out)
    expected = {**{k: meta[k] for k in (*SETTINGS_KEYS, "dataset_fingerprint")}, "num_images": num_images}
    differ = [k for k, v in expected.items() if store.meta.get(k) != v]
    if differ:
        shown = ", ".join(f"{k}: store {store.meta.get(k)!r}, asked {expected[k]!r}" for k in differ)
        raise ValueError(f"{out}: a proposal store for other images or settings is already there ({shown}); "
                         f"delete it or choose another output folder")
    print(f"proposals: {out} is already complete ({len(store)} images)", file=sys.stderr)
    return store


def _start_or_check_job(partial: Path, job: dict) -> None:
    """Record the run's settings in ``partial/job.json``, or check a resumed run matches them."""
    job_path = partial / "job.json"
    if job_path.is_file():
        old = read_json(job_path)
        differ = [k for k in sorted(set(job) | set(old)) if old.get(k) != job.get(k)]
        if differ:
            shown = ", ".join(f"{k}: before {old.get(k)!r}, now {job.get(k)!r}" for k in differ)
            raise ValueError(f"{partial}: an unfinished run with other images or settings ({shown}); "
                             f"delete {partial} to start over, or re-run with the same inputs and settings")
        return
    write_json_atomic(job_path, job)


def _chunk_path(partial: Path, k: int) -> Path:
    return partial / f"chunk_{k:06d}.npz"


def _num_workers(workers: int, num_tasks: int) -> int:
    if workers <= 0:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(workers, num_tasks))


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core: OpenCV's own threads would only compete


def _propose_file(task: tuple[int, str, dict]) -> tuple[np.ndarray, str]:
    """Worker task (image_id, path, settings) -> (boxes float32 [R, 4] xyxy, failure reason or "")."""
    _, path, settings = task
    try:
        return selective_search(read_image(path), **settings), ""
    except ImageReadError as e:
        return np.zeros((0, 4), np.float32), e.reason
    except Exception as e:  # noqa: BLE001 -- one bad image must not stop a 100k-image run
        return np.zeros((0, 4), np.float32), f"{type(e).__name__}: {e}"


def _compute_chunks(items: list[tuple[int, str]], todo: list[int], partial: Path, settings: dict, *,
                    workers: int, chunk_size: int, progress: bool, desc: str) -> None:
    """Propose the images of chunks ``todo`` and write one chunk file per chunk, in order."""
    chunks = [items[k * chunk_size:(k + 1) * chunk_size] for k in todo]
    tasks = [(image_id, path, settings) for chunk in chunks for image_id, path in chunk]
    if not tasks:
        return
    num_workers = _num_workers(workers, len(tasks))
    # In a log file (a batch job) the bar still shows, once every 30 s.
    with tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:
        if num_workers == 1:
            _write_chunks(todo, chunks, map(_propose_file, tasks), partial, bar)
            return
        # spawn: workers start clean (no inherited OpenCV/torch thread state) on every OS. An
        # executor rather than multiprocessing.Pool: if a worker dies (killed for memory, a crash
        # inside OpenCV) it raises BrokenProcessPool where Pool.imap would wait forever.
        pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker)
        try:
            # Ordered results, one image per task: an image takes ~1 s, so the IPC is negligible
            # and small tasks keep every worker busy to the end.
            _write_chunks(todo, chunks, pool.map(_propose_file, tasks, chunksize=1), partial, bar)
        except BrokenProcessPool:
            raise ValueError(f"proposals: a worker process died (out of memory, or a crash inside "
                             f"OpenCV); finished chunks are kept in {partial}. Re-run to resume, "
                             f"with fewer --workers if memory is short") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on an error, drop the queued images


def _write_chunks(todo: list[int], chunks: list[list[tuple[int, str]]],
                  results: Iterator[tuple[np.ndarray, str]], partial: Path, bar: tqdm) -> None:
    results = iter(results)
    for k, chunk in zip(todo, chunks):
        boxes_per_image, reasons = [], []
        for _ in chunk:
            boxes, reason = next(results)
            boxes_per_image.append(boxes)
            reasons.append(reason)
            bar.update(1)
        failed = np.array([i for i, r in enumerate(reasons) if r], dtype=np.int64)
        with atomic_path(_chunk_path(partial, k)) as tmp, open(tmp, "wb") as f:
            np.savez(f, image_ids=np.array([i for i, _ in chunk], dtype=np.int64),  # [n]
                     counts=np.array([len(b) for b in boxes_per_image], dtype=np.int64),  # [n]
                     boxes=np.concatenate([np.zeros((0, 4), np.float32), *boxes_per_image]),  # [sum, 4]
                     failed=failed,  # [f] positions in the chunk
                     reasons=np.array([reasons[i] for i in failed], dtype=str))  # [f]


def _read_chunk(partial: Path, k: int, chunk: list[tuple[int, str]],
                with_boxes: bool = True) -> dict[str, np.ndarray]:
    """Arrays of chunk file k, checked against the chunk's (image_id, path) list."""
    path = _chunk_path(partial, k)
    keys = ["image_ids", "counts", "failed", "reasons"] + (["boxes"] if with_boxes else [])
    try:
        with np.load(path, allow_pickle=False) as z:  # an npz reads only the arrays asked for
            data = {key: z[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"{path}: unreadable chunk ({e}); delete it and re-run to redo it") from None
    if data["image_ids"].tolist() != [i for i, _ in chunk] or (
            with_boxes and data["counts"].sum() != len(data["boxes"])):
        raise ValueError(f"{path}: holds other images than chunk {k} of this run; delete {partial} and re-run")
    return data


def _merge_chunks(items: list[tuple[int, str]], partial: Path, out: Path, meta: dict, *,
                  num_chunks: int, chunk_size: int) -> ProposalStore:
    """Stream all chunk files, in order, into the store ``out``; remove ``partial``."""
    def chunk_items(k: int) -> list[tuple[int, str]]:
        return items[k * chunk_size:(k + 1) * chunk_size]

    def boxes_stream() -> Iterable[np.ndarray]:
        for k in range(num_chunks):
            data = _read_chunk(partial, k, chunk_items(k))
            yield from np.split(data["boxes"], np.cumsum(data["counts"])[:-1])

    try:
        failures = []
        for k in range(num_chunks):
            data = _read_chunk(partial, k, chunk_items(k), with_boxes=False)
            for position, reason in zip(data["failed"].tolist(), data["reasons"].tolist()):
                image_id, path = chunk_items(k)[position]
                failures.append({"image_id": image_id, "file": path, "reason": reason})
        if items and len(failures) == len(items):  # a wrong image folder, not bad images
            shutil.rmtree(partial, ignore_errors=True)
            first = failures[0]
            raise ValueError(f"proposals: all {len(items)} images failed, e.g. {first['file']}: "
                             f"{first['reason']}; check the image paths (--images); no store written")
        write_store(out, image_ids=[i for i, _ in items], boxes_per_image=boxes_stream(),
                    meta={**meta, "failures": failures}, files=[p for _, p in items], scratch_dir=partial)
    except (FileExistsError, ValueError):
        # Another shard finished at the same moment and merged first (and may have removed
        # ``partial`` under us): its store is the same bytes.
        if not (out / "meta.json").is_file():
            raise
        return _existing_store(out, meta, len(items))
    shutil.rmtree(partial, ignore_errors=True)
    store = ProposalStore(out)
    if failures:
        shown = "; ".join(f"id {f['image_id']} {f['file']}: {f['reason']}" for f in failures[:3])
        print(f"proposals: {len(failures)} of {len(items)} images failed and have no proposals "
              f"(listed in {out / 'meta.json'}): {shown}{' ...' if len(failures) > 3 else ''}", file=sys.stderr)
    return store


# ---------------------------------------------------------------------------------------------
# Recall
# ---------------------------------------------------------------------------------------------

IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)  # COCO's 0.5:0.95, for average recall


def proposal_recall(dataset, store, top_ks: Iterable[int] = RECALL_TOP_KS, progress: bool = False) -> dict:
    """Recall of the proposals against the ground truth, at several numbers of proposals.

    For each k of ``top_ks`` the first k proposals of every image (selective search's ranking)
    are compared with its ground truth (difficult / crowd boxes, ``gt_difficult``, are ignored):
    - "recall@0.5", "recall@0.7": fraction of GT boxes covered at that IoU; each proposal covers
      at most one GT box, matched greedily from the highest IoU down (detectron2
      ``_eval_box_proposals``, fast-rcnn ``imdb.evaluate_recall``). A GT box in an image with no
      proposal counts as missed.
    - "AR": recall averaged over IoU 0.5:0.95 (step 0.05), the same matching.
    - "ABO": mean over GT boxes of the best IoU of any proposal (no one-to-one matching).
    - "MABO": [SS]'s mean ABO: the ABO of each class, averaged over classes with GT.
    - "avg_proposals": mean number of proposals per image actually used (min(k, R)).
    Returns {"top_k": [T], metric: [T] floats}: the ``proposal_recall`` block of metrics.json
    (detect.report). A metric with no GT box to measure is -1 (n/a).
    """
    top_ks = sorted({int(k) for k in top_ks})
    if not top_ks or top_ks[0] < 1:
        raise ValueError(f"proposal_recall: top_ks must be positive, got {top_ks}")
    if hasattr(store, "check_dataset"):
        store.check_dataset(dataset)
    matched = {k: [] for k in top_ks}  # k -> [G_i] matched IoU per GT box (0 = unmatched)
    best = {k: [] for k in top_ks}  # k -> [G_i] best IoU per GT box
    used = {k: [] for k in top_ks}  # k -> number of proposals used per image
    gt_classes = []
    for record in tqdm(dataset.records, desc="recall", unit="img", disable=None if progress else True):
        proposal_boxes = store.get(record.image_id)[:top_ks[-1]]  # [R, 4]
        for k in top_ks:
            used[k].append(min(k, len(proposal_boxes)))
        gt_boxes, classes = _counted_gt(record)  # [G, 4], [G]
        if len(gt_boxes) == 0:
            continue
        gt_classes.append(classes)
        iou = _box_iou(proposal_boxes, gt_boxes)  # [R, G]
        for k in top_ks:
            iou_k = iou[:k]  # [min(k, R), G]
            best[k].append(iou_k.max(axis=0) if len(iou_k) else np.zeros(len(gt_boxes)))
            matched[k].append(_greedy_match(iou_k))

    classes = np.concatenate(gt_classes) if gt_classes else np.zeros(0, np.int64)  # [G_total]
    result: dict[str, list] = {"top_k": top_ks}
    for k in top_ks:
        m = np.concatenate(matched[k]) if matched[k] else np.zeros(0)  # [G_total]
        b = np.concatenate(best[k]) if best[k] else np.zeros(0)  # [G_total]
        recalls = [float((m >= t).mean()) if len(m) else -1.0 for t in IOU_THRESHOLDS]
        class_abo = [b[classes == c].mean() for c in np.unique(classes)]
        result.setdefault("recall@0.5", []).append(recalls[0])
        result.setdefault("recall@0.7", []).append(recalls[4])
        result.setdefault("AR", []).append(float(np.mean(recalls)) if len(m) else -1.0)
        result.setdefault("ABO", []).append(float(b.mean()) if len(b) else -1.0)
        result.setdefault("MABO", []).append(float(np.mean(class_abo)) if class_abo else -1.0)
        result.setdefault("avg_proposals", []).append(float(np.mean(used[k])) if used[k] else 0.0)
    return result


def _box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU [A, B] of xyxy boxes [A, 4] and [B, 4], in float64. (detect.boxes.box_iou_numpy goes
    through torch; this module stays torch-free so that workers and `detect recall` start fast.)"""
    boxes1 = boxes1.astype(np.float64)[:, None, :]  # [A, 1, 4]
    boxes2 = boxes2.astype(np.float64)[None, :, :]  # [1, B, 4]
    inter_w = (np.minimum(boxes1[..., 2], boxes2[..., 2]) - np.maximum(boxes1[..., 0], boxes2[..., 0])).clip(0)
    inter_h = (np.minimum(boxes1[..., 3], boxes2[..., 3]) - np.maximum(boxes1[..., 1], boxes2[..., 1])).clip(0)
    inter = inter_w * inter_h  # [A, B]
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])  # [A, 1]
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])  # [1, B]
    union = area1 + area2 - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _counted_gt(record) -> tuple[np.ndarray, np.ndarray]:
    """The GT boxes [G, 4] xyxy and classes [G] that recall counts: all but difficult / crowd."""
    gt_boxes = np.asarray(record.gt_boxes, dtype=np.float32).reshape(-1, 4)
    gt_classes = np.asarray(record.gt_classes, dtype=np.int64).reshape(-1)
    difficult = np.asarray(record.gt_difficult, dtype=bool).reshape(-1)
    if len(difficult) == 0:  # ImageRecord's default: no flags given, none difficult
        difficult = np.zeros(len(gt_boxes), dtype=bool)
    if len(difficult) != len(gt_boxes) or len(gt_classes) != len(gt_boxes):
        raise ValueError(f"image {record.image_id} ({record.file_name}): {len(gt_boxes)} GT boxes but "
                         f"{len(gt_classes)} classes and {len(difficult)} difficult flags")
    return gt_boxes[~difficult], gt_classes[~difficult]


def _greedy_match(iou: np.ndarray) -> np.ndarray:
    """[R, G] IoU -> [G] IoU of each GT box's proposal under greedy one-to-one matching (0 = none)."""
    iou = iou.copy()
    out = np.zeros(iou.shape[1], dtype=np.float64)  # [G]
    for _ in range(min(iou.shape)):
        r, g = np.unravel_index(int(np.argmax(iou)), iou.shape)
        if iou[r, g] < 0:
            break
        out[g] = iou[r, g]
        iou[r, :] = -1.0
        iou[:, g] = -1.0
    return out


def format_recall_table(recall: dict) -> str:
    """The ``proposal_recall`` result as a text table, one row per top-k."""
    keys = ["avg_proposals", "recall@0.5", "recall@0.7", "AR", "ABO", "MABO"]
    header = f"{'top-k':>6}  " + "  ".join(f"{k:>13}" for k in keys)
    rows = [header]
    for i, k in enumerate(recall["top_k"]):
        cells = [f"{recall[key][i]:13.1f}" if key == "avg_proposals" else f"{recall[key][i]:13.4f}" for key in keys]
        rows.append(f"{k:>6}  " + "  ".join(cells))
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def cli_propose(args) -> int:
    """``detect propose``: a store for a dataset (``--data``) or for files (``--input``).

    With ``--input`` (files, folders searched recursively, globs) the image ids are the 1-based
    positions in the sorted list of resolved paths (the ids ``detect predict`` gives them). The
    resolved config is written to ``<out>/config.yaml``. Hidden: ``DETECT_PROPOSAL_CHUNK`` sets
    the images per chunk file (default 256; tests use small chunks).
    """
    from detect.config import load_config, save_config

    cfg = load_config(args.config, args.overrides)
    settings = proposal_settings(cfg.proposals)
    if args.input and args.data:
        raise ValueError("give either --data (a dataset) or --input (image files), not both")
    if args.input:
        items = [(i + 1, str(path)) for i, path in enumerate(find_images(args.input))]
    elif args.data:
        from detect.data import load_dataset

        dataset = load_dataset(args.format, args.data, args.images, args.split)
        items = [(r.image_id, r.file_name) for r in dataset.records]
    else:
        raise ValueError("give --data (a dataset) or --input (image files, folders or globs)")
    chunk_size = int(os.environ.get("DETECT_PROPOSAL_CHUNK", DEFAULT_CHUNK_SIZE))
    shard = _parse_shard(args.shard)
    workers = args.workers

    distributed = False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if shard is None and world_size > 1 and "RANK" in os.environ:  # under torchrun
        shard = (int(os.environ["RANK"]), world_size)
        if workers <= 0:  # share the node's cores between its ranks
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            workers = max(1, _num_workers(0, 1 << 30) // local_ranks)
        distributed = _init_process_group()
    store = generate_proposals(items, args.out, settings=settings, workers=workers, shard=shard,
                               chunk_size=chunk_size, merge=not distributed)
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # every rank's chunks are on disk
        if shard[0] == 0:
            store = generate_proposals(items, args.out, settings=settings, workers=workers,
                                       chunk_size=chunk_size)
        dist.destroy_process_group()
    if store is None:
        return 0
    save_config(cfg, store.path / "config.yaml")
    num_boxes = store.meta["num_boxes"]
    print(f"{store.path}: {len(store)} images, {num_boxes} proposals "
          f"({num_boxes / max(len(store), 1):.0f} per image), {len(store.meta['failures'])} failed")
    return 0


def cli_recall(args) -> int:
    """``detect recall``: print recall / AR / (M)ABO of a store on a dataset; ``--out`` JSON.

    The JSON is ``proposal_recall``'s result plus "num_images", "num_gt" (non-difficult GT
    boxes) and "avg_proposals_per_image" (all proposals in the store for these images).
    """
    from detect.data import load_dataset

    if not args.data:
        raise ValueError("detect recall needs --data (the dataset the proposals were made for)")
    dataset = load_dataset(args.format, args.data, args.images, args.split)
    store = ProposalStore(args.proposals)
    recall = proposal_recall(dataset, store, progress=True)
    num_gt = sum(len(_counted_gt(r)[0]) for r in dataset.records)
    avg = float(np.mean([store.num_boxes(r.image_id) for r in dataset.records])) if len(dataset) else 0.0
    summary = {**recall, "num_images": len(dataset), "num_gt": num_gt, "avg_proposals_per_image": avg}
    print(f"{store.path} on {dataset.name}: {len(dataset)} images, {num_gt} GT boxes, "
          f"{avg:.1f} proposals per image ({store.meta.get('mode')} mode)")
    print(format_recall_table(recall))
    if args.out:
        write_json_atomic(args.out, summary)
        print(f"wrote {args.out}")
    return 0


def find_images(inputs: list[str]) -> list[Path]:
    """Files, folders (searched recursively for IMAGE_EXTENSIONS) and globs -> sorted resolved
    paths, without repeats. An input that matches nothing raises FileNotFoundError naming it."""
    found: set[Path] = set()

    def add_dir(folder: Path) -> None:
        for root, _, names in os.walk(folder):
            found.update(Path(root, n).resolve() for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS)

    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            add_dir(path)
        elif path.is_file():
            found.add(path.resolve())
        elif glob.has_magic(item):
            matches = [Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True)]
            if not matches:
                raise FileNotFoundError(f"--input {item!r}: the pattern matches no files")
            for m in matches:
                if m.is_dir():
                    add_dir(m)
                elif m.suffix.lower() in IMAGE_EXTENSIONS:
                    found.add(m.resolve())
        else:
            hint = " (config overrides go before --input)" if "=" in item else ""
            raise FileNotFoundError(f"--input {item!r}: no such file or folder{hint}")
    return sorted(found, key=str)


def _parse_shard(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r}: needs 0 <= i < N")
    return i, n


def _init_process_group() -> bool:
    """Join torchrun's process group (gloo) so rank 0 can merge after a barrier; False if not."""
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return True
    except Exception as e:  # noqa: BLE001 -- fall back to plain shards
        print(f"proposals: no process group ({type(e).__name__}: {e}); each rank computes its shard "
              f"and the last to finish merges", file=sys.stderr)
        return False
