"""Batch detection on image files, folders and globs: ``detect predict``.

The main process runs the detector, one image at a time; worker processes read the images and
propose boxes ahead of it (at most ``2 x workers`` images in flight), results in input order.

Outputs in ``output_dir`` (each written atomically; paths never leave ``output_dir``):

- ``detections.json``  COCO results: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}].
- ``images.json``      [{"id", "file_name", "width", "height"}]: ``id`` is the 1-based position
                       of the resolved input path in the sorted input list.
- ``categories.json``  [{"id", "name"}]: the checkpoint's class names and category ids.
- ``detections.jsonl`` one line per image, in input order: {"image_id", "file", "width",
                       "height", "detections": [{"box": [x1, y1, x2, y2], "label": name,
                       "score"}]}, boxes in pixels of the image as the user sees it (EXIF).
- ``errors.json``      [{"file", "reason"}]: files that could not be read or proposed, or are no
                       image ("unsupported file type").
- ``summary.json``     ``PredictSummary`` (``summary.rank{r}.json`` per rank).
- ``vis/<name>.jpg``   with ``visualize``: the detections drawn (``safe_relative_name``).

Resume: every finished image appends a flushed line to the journal ``partial/done.jsonl``
(``done.rank{r}.jsonl`` per rank), as in ``detections.jsonl`` but with class indices 1..K as
labels, or {"file", "error"}. A re-run skips files with a result in any journal (failures are
retried) and refuses other settings (``partial/settings.json``). The final files are rewritten
from the journals at the end and every ``REWRITE_EVERY_IMAGES`` images, so a killed run loses
only the images in flight. With ``world_size > 1`` rank r takes images i with
``i % world_size == r``; the last rank to finish merges all journals.
"""

from __future__ import annotations

import collections
import itertools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

from detect.common.fileio import start_or_resume, write_json_atomic
from detect.common.cpus import available_cores
from detect.common.runtime import local_world_size
from detect.data.images import IMAGE_EXTENSIONS, ImageReadError, find_images, read_image
from detect.models.detector import Detections, Detector, StageTimer
from detect.predict.outputs import (journal_record, load_results, open_journal, safe_relative_name,
                                    write_outputs, write_visualisation)
from detect.proposals.selective_search import selective_search
from detect.proposals.store import ProposalStore

# Rewrite the final outputs every this many images, at most every this many seconds.
REWRITE_EVERY_IMAGES = 100
REWRITE_MIN_INTERVAL_S = 30.0

ProposeFn = Callable[..., np.ndarray]  # as selective_search


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one core per worker; the pool provides the parallelism
    torch.set_num_threads(1)


class Loaded(NamedTuple):  # what a worker sends back for one input file
    image: np.ndarray | None  # [H, W, 3] uint8 RGB, None on error
    proposals: np.ndarray | None  # [R, 4] xyxy float32, None on error or with a store
    error: str  # "" or why the file has no result
    read_ms: float
    propose_ms: float


def _load_and_propose(file: str, propose_fn: ProposeFn | None, settings: dict) -> Loaded:
    """Worker task: read ``file`` and propose boxes (``propose_fn=None``: only read); never raises."""
    t0 = time.perf_counter()
    try:
        image = read_image(file)
    except ImageReadError as e:
        return Loaded(None, None, e.reason, 0.0, 0.0)
    t1 = time.perf_counter()
    read_ms = (t1 - t0) * 1e3
    if propose_fn is None:
        return Loaded(image, None, "", read_ms, 0.0)
    try:
        proposals = np.asarray(propose_fn(image, **settings), dtype=np.float32).reshape(-1, 4)
    except Exception as e:  # noqa: BLE001 - any failure of one image is recorded, not raised
        return Loaded(None, None, f"proposals failed: {type(e).__name__}: {e}", read_ms, 0.0)
    return Loaded(image, proposals, "", read_ms, (time.perf_counter() - t1) * 1e3)


def _store_ids(store, files: list[str]) -> dict[str, int]:
    """file -> image id in a ``detect propose --input`` store, for every file; ValueError if missing."""
    by_id = store.files()
    if by_id is None:
        raise ValueError(f"proposal store {store.path} has no files.json, so its images cannot be "
                         f"matched to files; make it with `detect propose --input ...`")
    by_file = {str(Path(f).resolve()): image_id for image_id, f in by_id.items()}
    missing = [f for f in files if f not in by_file or by_file[f] not in store]
    if missing:
        raise ValueError(f"proposal store {store.path} lacks {len(missing)} of the {len(files)} "
                         f"input files, e.g. {', '.join(missing[:5])}; run `detect propose "
                         f"--input` on the same inputs")
    return {f: by_file[f] for f in files}


@dataclass
class PredictSummary:
    num_inputs: int  # image files found (all ranks)
    num_images: int  # images with results in the output files
    num_errors: int  # files in errors.json
    num_detections: int  # detections at or above the score threshold, all images
    num_processed: int  # images this call (this rank) ran, errors included
    num_skipped: int  # images of this rank already done by an earlier run (resume)
    elapsed_s: float
    images_per_s: float  # num_processed / elapsed_s
    device: str
    rank: int
    world_size: int
    # Per stage: in the workers (read, proposals; overlapped) and in the main process (wait, the
    # detector's own stages).
    ms_per_image: dict[str, float]


def predict(detector: Detector, inputs: list[str], output_dir: str | os.PathLike, *,
            score_threshold: float = 0.5, proposal_settings: dict | None = None,
            workers: int = 0, proposal_store: str | os.PathLike | None = None,
            visualize: bool = False, progress: bool = True, propose_fn: ProposeFn | None = None,
            rank: int = 0, world_size: int = 1, model_fingerprint: str = "") -> PredictSummary:
    """Detect objects in every image of ``inputs`` into the outputs of the module docstring,
    resuming a run in ``output_dir``. Proposals: ``propose_fn(image, **proposal_settings)``
    (default ``selective_search``) or ``proposal_store``. ``workers``: processes (0 = all cores,
    shared by the machine's torchrun ranks). ``model_fingerprint`` identifies the checkpoint: a
    resume with another model is refused."""
    start = time.perf_counter()
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = all cores), got {workers}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    class_names, category_ids = list(detector.class_names), list(detector.category_ids)
    proposal_settings = proposal_settings or {}
    workers = workers or max(1, available_cores() // local_world_size())
    output_dir = Path(output_dir)
    partial_dir = output_dir / "partial"

    unsupported: list[Path] = []
    paths = find_images(inputs, exclude=output_dir, unsupported=unsupported)
    files = [str(p) for p in paths]
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {inputs}")
    common_root = os.path.commonpath([str(p.parent) for p in paths])

    store = ProposalStore(proposal_store) if proposal_store is not None else None
    store_ids = _store_ids(store, files) if store is not None else None
    propose_fn = propose_fn or selective_search
    proposals = {"store": str(Path(proposal_store).resolve())} if store is not None else proposal_settings
    run_settings = {"score_threshold": score_threshold, "class_names": class_names, "category_ids": category_ids,
                    "model": model_fingerprint, "proposals": proposals}
    start_or_resume(partial_dir / "settings.json", run_settings,
                    hint="use a new --output-dir, or delete its partial/ folder to start over")
    done, _, _ = load_results(partial_dir)
    mine = [i for i in range(len(files)) if i % world_size == rank]
    todo = [i for i in mine if files[i] not in done]
    num_skipped = len(mine) - len(todo)
    if num_skipped:
        print(f"detect predict: resuming: {num_skipped} image(s) already done in {output_dir}",
              file=sys.stderr)

    def merge() -> dict[str, int]:
        return write_outputs(output_dir, files, class_names=class_names, category_ids=category_ids,
                             unsupported=[str(p) for p in unsupported])

    timer = StageTimer(detector.device)  # main-process stages: wait, the detector's, visualize
    worker_ms = {"read_in_workers": 0.0, "proposals_in_workers": 0.0}  # summed over workers
    since_merge, last_merge = 0, time.perf_counter()
    # One image to do: its hierarchies on all cores (the same boxes); else one image per worker.
    one_image = propose_fn is selective_search and len(todo) == 1
    call_settings = {**proposal_settings, "threads": available_cores()} if one_image else proposal_settings
    worker_fn = None if store is not None else propose_fn
    pending: collections.deque[tuple[int, Future]] = collections.deque()  # (index, Loaded), in order
    to_submit = iter(todo)

    def submit_more(pool: ProcessPoolExecutor) -> None:  # keep 2 x workers images in flight
        for i in itertools.islice(to_submit, 2 * workers - len(pending)):
            pending.append((i, pool.submit(_load_and_propose, files[i], worker_fn, call_settings)))

    bar = tqdm(total=len(todo), unit="img", desc="predict", disable=not progress or None,
               dynamic_ncols=True, file=sys.stderr)
    # Fork (spawn where there is none) while this process's OpenCV thread pool is stopped: a
    # worker forked from a running pool (as in `detect demo`) hangs in cv2.setNumThreads.
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(max_workers=min(workers, max(len(todo), 1)),
                               mp_context=multiprocessing.get_context(method), initializer=_init_worker)
    journal = open_journal(partial_dir / ("done.jsonl" if world_size == 1 else f"done.rank{rank}.jsonl"))
    try:
        submit_more(pool)
        while pending:
            index, future = pending[0]
            try:
                with timer("wait"):  # the detector waiting for the workers
                    loaded = future.result()
            except BrokenProcessPool:
                in_flight = ", ".join(files[i] for i, _ in pending)
                raise RuntimeError(
                    f"a worker process died (killed for lack of memory?) while reading or "
                    f"proposing one of: {in_flight}; finished images are kept in "
                    f"{partial_dir}, re-run to resume") from None
            pending.popleft()
            submit_more(pool)
            worker_ms["read_in_workers"] += loaded.read_ms
            worker_ms["proposals_in_workers"] += loaded.propose_ms
            file = files[index]
            record = {"file": file, "error": loaded.error}
            if not loaded.error:
                proposals = store.get(store_ids[file]) if store is not None else loaded.proposals  # [R, 4]
                record = _detect_one(detector, file, loaded.image, proposals, score_threshold, timer)
            journal.write(json.dumps(record) + "\n")
            journal.flush()
            if visualize and "error" not in record:
                with timer("visualize"):
                    write_visualisation(output_dir / "vis", safe_relative_name(file, common_root),
                                        loaded.image, record, class_names)
            bar.update(1)
            since_merge += 1
            if (since_merge >= REWRITE_EVERY_IMAGES
                    and time.perf_counter() - last_merge >= REWRITE_MIN_INTERVAL_S):
                merge()
                since_merge, last_merge = 0, time.perf_counter()
    finally:
        journal.close()
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
        cv2.setNumThreads(cv2_threads)

    counts = merge()
    elapsed = time.perf_counter() - start
    summary = PredictSummary(
        num_inputs=len(files), num_images=counts["images"], num_errors=counts["errors"],
        num_detections=counts["detections"], num_processed=len(todo), num_skipped=num_skipped,
        elapsed_s=round(elapsed, 3), images_per_s=round(len(todo) / max(elapsed, 1e-9), 3),
        device=str(detector.device), rank=rank, world_size=world_size,
        ms_per_image={k: round(v / max(len(todo), 1), 3)
                      for k, v in {**worker_ms, **timer.totals_ms}.items()})
    write_json_atomic(output_dir / ("summary.json" if world_size == 1 else f"summary.rank{rank}.json"), asdict(summary))
    return summary


def _detect_one(detector: Detector, file: str, image: np.ndarray, proposals: np.ndarray,
                score_threshold: float, timer: StageTimer) -> dict:
    """Run the detector on one image -> its journal record ({"file", "error"} on GPU OOM)."""
    if len(proposals) == 0:  # nothing to score (e.g. a tiny image): no detections
        return journal_record(file, image, Detections.empty(), score_threshold)
    try:
        dets = detector.detect(image, proposals, timer=timer)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"file": file, "error": f"out of GPU memory ({image.shape[1]}x{image.shape[0]} image, "
                                       f"{len(proposals)} proposals)"}
    return journal_record(file, image, dets, score_threshold)
