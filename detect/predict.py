"""Batch detection on image files, folders and globs: ``detect predict``.

The main process runs the detector; a pool of worker processes reads the images and computes
their selective-search proposals ahead of it (a bounded window of ``batch_size + 2 x workers``
images in flight), so proposals and inference overlap. Results come back in input order.

Outputs in ``output_dir`` (every file written atomically, paths never leave ``output_dir``):

- ``detections.json``  COCO results: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}].
- ``images.json``      the file table for those ids: [{"id", "file_name", "width", "height"}];
                       ``file_name`` is the resolved input path, ``id`` its 1-based position in
                       the sorted input list (so ids do not depend on workers, ranks or resumes).
- ``categories.json``  [{"id", "name"}]: the checkpoint's class names and category ids.
- ``detections.jsonl`` one line per image, in input order: {"image_id", "file", "width",
                       "height", "detections": [{"box": [x1, y1, x2, y2], "label": name,
                       "score"}]}; boxes are xyxy pixels of the image as the user sees it
                       (after EXIF rotation).
- ``errors.json``      [{"file", "reason"}] for files that could not be read or proposed.
- ``summary.json``     counts, images/s, device, elapsed, ms per image per stage
                       (``summary.rank{r}.json`` per rank when ``world_size > 1``).
- ``vis/<name>.jpg``   with ``visualize``: the image with boxes, labels and scores drawn.
                       ``<name>`` is the input's path relative to the inputs' common folder,
                       each part reduced to safe characters (hash-suffixed when changed).

Resume: every finished image appends one flushed line to the journal ``partial/done.jsonl``
(``partial/done.rank{r}.jsonl`` per rank), in the format of ``detections.jsonl`` but with class
indices 1..K as labels, or {"file", "error"} for a failure. A re-run into the same folder skips
files with a result in any journal (failures are retried), ignores a torn last line left by a
kill, and refuses to mix results of different settings (``partial/settings.json``). The final
files are rewritten from the journals at the end, and during the run every 100 images (but
at least 30 s apart), so a killed run loses only the images in flight.

Distributed: with ``world_size > 1`` rank r takes images i with ``i % world_size == r``; each
rank merges all journals when it finishes (under a file lock), so the last rank to finish
writes the complete outputs.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from detect.data import IMAGE_EXTENSIONS, ImageReadError, read_image
from detect.detector import Detections, Detector, StageTimer
from detect.io import read_json, write_bytes_atomic, write_json_atomic

try:
    import fcntl  # POSIX: serialises the ranks' merges
except ImportError:  # Windows: one process at a time anyway
    fcntl = None

# Rewrite the final outputs from the journal every this many images, but not more often than
# every this many seconds (a merge re-reads the whole journal).
REWRITE_EVERY_IMAGES = 100
REWRITE_MIN_INTERVAL_S = 30.0

ProposeFn = Callable[..., np.ndarray]  # (image uint8 RGB [H, W, 3], **settings) -> [R, 4] xyxy


# ---------------------------------------------------------------------------------------------
# Inputs and safe output names
# ---------------------------------------------------------------------------------------------

def find_inputs(inputs: list[str], *, exclude: str | os.PathLike | None = None) -> list[Path]:
    """Files, folders (searched recursively) and globs -> sorted, unique resolved image paths.

    The same listing as ``detect propose --input`` (``detect.proposals.find_images``: folders
    and globs keep ``IMAGE_EXTENSIONS`` in any case, a file named explicitly is kept whatever
    its name, an input matching nothing raises ``FileNotFoundError``), less the files under
    ``exclude`` (the output folder), so a re-run never reads its own ``vis/`` images back.
    """
    from detect.proposals import find_images

    found = find_images(inputs)
    if exclude is not None:
        exclude_dir = Path(exclude).resolve()
        found = [p for p in found if not p.is_relative_to(exclude_dir)]
    return found


_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def safe_relative_name(path: str | os.PathLike, root: str | os.PathLike, suffix: str = ".jpg") -> str:
    """A relative output name for ``path`` that cannot leave the folder it is joined to.

    The name is ``path`` relative to ``root`` (or just its file name when it is not under
    ``root``) plus ``suffix``, so ``a/b.png`` -> ``a/b.png.jpg`` (keeping the extension keeps
    ``b.png`` and ``b.jpg`` apart). Each part is reduced to ``[A-Za-z0-9._-]``, ``.``/``..``
    and hidden names are prefixed with ``_``, long parts are cut; when anything changed, a
    short hash of the full path is added so two different inputs never share a name.
    """
    path = os.path.abspath(path)
    root = os.path.abspath(root)
    try:
        rel = os.path.relpath(path, root)
    except ValueError:  # different drives (Windows)
        rel = os.path.basename(path)
    parts = [p for p in Path(rel).parts if p not in ("", os.sep)]
    if not parts or parts[0] == "..":
        parts = [os.path.basename(path) or "image"]
    safe_parts = []
    for part in parts:
        safe = _SAFE_CHARS.sub("_", part)[:100]
        if not safe or safe.startswith("."):
            safe = "_" + safe
        safe_parts.append(safe)
    name = "/".join(safe_parts)
    if safe_parts != parts:
        digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = f"{name}-{digest}"
    return name + suffix


def _inside(path: Path, folder: Path) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


# ---------------------------------------------------------------------------------------------
# Worker processes: read the image, compute proposals
# ---------------------------------------------------------------------------------------------

def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one core per worker; the pool provides the parallelism
    torch.set_num_threads(1)


class Loaded(NamedTuple):
    """What a worker sends back for one input file."""

    index: int  # position in the sorted input list
    image: np.ndarray | None  # [H, W, 3] uint8 RGB, None on error
    proposals: np.ndarray | None  # [R, 4] xyxy float32, None on error or with a store
    error: str  # "" or why the file has no result
    read_ms: float
    propose_ms: float


def _load_and_propose(index: int, file: str, propose_fn: ProposeFn | None, settings: dict) -> Loaded:
    """Worker task: read ``file`` and propose boxes in it.

    ``propose_fn=None`` only reads the image (proposals come from a store). Failures come back
    as a reason string, never as an exception, so one bad file cannot stop the run.
    """
    t0 = time.perf_counter()
    try:
        image = read_image(file)
    except ImageReadError as e:
        return Loaded(index, None, None, e.reason, 0.0, 0.0)
    t1 = time.perf_counter()
    read_ms = (t1 - t0) * 1e3
    if propose_fn is None:
        return Loaded(index, image, None, "", read_ms, 0.0)
    try:
        proposals = np.asarray(propose_fn(image, **settings), dtype=np.float32).reshape(-1, 4)
    except Exception as e:  # noqa: BLE001 - any failure of one image is recorded, not raised
        return Loaded(index, None, None, f"proposals failed: {type(e).__name__}: {e}", read_ms, 0.0)
    return Loaded(index, image, proposals, "", read_ms, (time.perf_counter() - t1) * 1e3)


def _default_propose_fn() -> ProposeFn:
    from detect.proposals import selective_search

    return selective_search


def _mp_context() -> multiprocessing.context.BaseContext:
    # fork where the platform has it (as torch's DataLoader): workers start instantly and never
    # touch the detector or CUDA; spawn elsewhere.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


# ---------------------------------------------------------------------------------------------
# Proposal store lookup
# ---------------------------------------------------------------------------------------------

def _store_ids(store, files: list[str]) -> dict[str, int]:
    """file -> image id in ``store`` (a ``detect propose --input`` store, whose files.json lists
    its resolved input paths), for every file of ``files``; ValueError naming missing files."""
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


# ---------------------------------------------------------------------------------------------
# Journal and final outputs
# ---------------------------------------------------------------------------------------------

def _read_journal(path: Path) -> tuple[list[dict], int]:
    """Records of one journal, and the number of unreadable lines skipped (a torn last line
    from a killed run is skipped silently and not counted)."""
    records, bad = [], 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = len(lines) - 1  # the text after the final newline: empty, or a torn line
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not (isinstance(rec, dict) and isinstance(rec.get("file"), str)
                    and ("error" in rec or isinstance(rec.get("detections"), list))):
                raise ValueError("not a record")
        except ValueError:
            bad += i != last
            continue
        if i == last:  # complete JSON but no newline: the write was cut short, redo the image
            continue
        records.append(rec)
    return records, bad


def _journal_paths(partial_dir: Path) -> list[Path]:
    return sorted(partial_dir.glob("done*.jsonl"))


def _open_journal(path: Path):
    """Open a journal for appending, first cutting off a torn last line (no final newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def _load_results(partial_dir: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """All journals -> (file -> result record, file -> error reason, bad line count).

    A file may have both (a retried failure that now works): the result wins."""
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    bad_total = 0
    for path in _journal_paths(partial_dir):
        records, bad = _read_journal(path)
        bad_total += bad
        for rec in records:
            if "error" in rec:
                errors[rec["file"]] = str(rec["error"])
            else:
                results[rec["file"]] = rec
    return results, errors, bad_total


def write_outputs(output_dir: str | os.PathLike, files: list[str], *, class_names: list[str],
                  category_ids: list[int]) -> dict[str, int]:
    """Rewrite detections.json, images.json, categories.json, detections.jsonl and errors.json
    from every journal in ``output_dir/partial``, keeping only ``files`` (the sorted inputs;
    image id = position + 1). Returns counts {"images", "errors", "detections"}."""
    output_dir = Path(output_dir)
    partial_dir = output_dir / "partial"
    partial_dir.mkdir(parents=True, exist_ok=True)
    with open(partial_dir / "merge.lock", "a") as lock:
        if fcntl is not None:  # ranks merging at once: the last one sees everything
            fcntl.flock(lock, fcntl.LOCK_EX)
        results, errors, bad = _load_results(partial_dir)
        if bad:
            print(f"detect predict: warning: skipped {bad} unreadable journal line(s) in "
                  f"{partial_dir}", file=sys.stderr)
        coco, images, lines, error_list = [], [], [], []
        for index, file in enumerate(files):
            image_id = index + 1
            rec = results.get(file)
            if rec is None:
                if file in errors:
                    error_list.append({"file": file, "reason": errors[file]})
                continue
            images.append({"id": image_id, "file_name": file, "width": rec["width"],
                           "height": rec["height"]})
            dets = []
            for det in rec["detections"]:
                x1, y1, x2, y2 = det["box"]
                label = int(det["label"])
                coco.append({"image_id": image_id, "category_id": category_ids[label - 1],
                             "bbox": [x1, y1, round(x2 - x1, 3), round(y2 - y1, 3)],
                             "score": det["score"]})
                dets.append({"box": det["box"], "label": class_names[label - 1],
                             "score": det["score"]})
            lines.append(json.dumps({"image_id": image_id, "file": file, "width": rec["width"],
                                     "height": rec["height"], "detections": dets}))
        categories = [{"id": c, "name": n} for c, n in zip(category_ids, class_names)]
        write_json_atomic(output_dir / "detections.json", coco, indent=None)
        write_json_atomic(output_dir / "images.json", images, indent=None)
        write_json_atomic(output_dir / "categories.json", categories)
        write_bytes_atomic(output_dir / "detections.jsonl",
                           "".join(line + "\n" for line in lines).encode("utf-8"))
        write_json_atomic(output_dir / "errors.json", error_list)
    return {"images": len(images), "errors": len(error_list), "detections": len(coco)}


def _record(file: str, image: np.ndarray, dets: Detections, score_threshold: float) -> dict:
    keep = dets.scores >= score_threshold
    boxes = dets.boxes[keep].tolist()  # [D, 4] xyxy
    scores = dets.scores[keep].tolist()
    labels = dets.labels[keep].tolist()
    return {"file": file, "width": int(image.shape[1]), "height": int(image.shape[0]),
            "detections": [{"box": [round(float(v), 3) for v in box], "label": int(label),
                            "score": round(float(score), 6)}
                           for box, label, score in zip(boxes, labels, scores)]}


# ---------------------------------------------------------------------------------------------
# Visualisation
# ---------------------------------------------------------------------------------------------

# Tableau-10, as RGB: distinct, readable on photos; black or white text by the colour's luma.
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def draw_detections(image: np.ndarray, record: dict, class_names: list[str]) -> np.ndarray:
    """Draw a journal record's boxes (xyxy), labels and scores on a copy of ``image`` (uint8
    RGB [H, W, 3]) -> uint8 RGB [H, W, 3]."""
    import cv2

    canvas = np.ascontiguousarray(image.copy())
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 300))
    font_scale = max(0.35, min(height, width) / 900)
    for det in record["detections"]:
        label = int(det["label"])
        color = _PALETTE[(label - 1) % len(_PALETTE)]
        x1, y1, x2, y2 = (int(round(v)) for v in det["box"])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        text = f"{class_names[label - 1]} {det['score']:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(y1 + th + base + 2, height - 1)
        cv2.rectangle(canvas, (x1, ty - th - base), (x1 + tw + 2, ty + base // 2), color, -1)
        luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        text_color = (0, 0, 0) if luma > 140 else (255, 255, 255)
        cv2.putText(canvas, text, (x1 + 1, ty - base // 2), cv2.FONT_HERSHEY_SIMPLEX,
                    font_scale, text_color, 1, cv2.LINE_AA)
    return canvas


def _write_visualisation(vis_dir: Path, name: str, image: np.ndarray, record: dict,
                         class_names: list[str]) -> None:
    import cv2

    path = vis_dir / name
    if not _inside(path, vis_dir):  # safe_relative_name makes this impossible; keep it so
        raise ValueError(f"refusing to write {path}: outside {vis_dir}")
    canvas = draw_detections(image, record, class_names)
    ok, buf = cv2.imencode(".jpg", canvas[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise ValueError(f"could not encode the visualisation of {record['file']}")
    write_bytes_atomic(path, buf.tobytes())


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

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
    # Per stage: in the workers (read, proposals: CPU time, overlapped with the rest) and in the
    # main process (wait = the detector idle waiting for workers, the detector's own stages).
    ms_per_image: dict[str, float]


def _check_settings(path: Path, settings: dict) -> None:
    """Refuse to resume into a folder whose journal was made with other settings."""
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    if path.exists():
        previous = read_json(path)
        if previous != settings:
            changed = sorted(k for k in settings.keys() | previous.keys()
                             if settings.get(k) != previous.get(k))
            raise ValueError(
                f"{path.parent.parent}: holds results made with other settings ({', '.join(changed)}"
                f" differ from {path}); use a new --output-dir, or delete its partial/ folder to "
                f"start over")
    else:
        write_json_atomic(path, settings)


def predict(detector: Detector, inputs: list[str], output_dir: str | os.PathLike, *,
            score_threshold: float = 0.5, proposal_settings: dict | None = None,
            workers: int = 0, batch_size: int = 1, proposal_store: str | os.PathLike | None = None,
            visualize: bool = False, progress: bool = True,
            category_ids: list[int] | None = None, propose_fn: ProposeFn | None = None,
            rank: int = 0, world_size: int = 1, model_fingerprint: str = "") -> PredictSummary:
    """Detect objects in every image of ``inputs`` (files, folders, globs); write the outputs
    described in the module docstring to ``output_dir``; resume a previous run there.

    ``proposal_settings`` are the keyword arguments of ``propose_fn`` (default
    ``detect.proposals.selective_search``); with ``proposal_store`` (a ``detect propose
    --input`` store) proposals come from the store instead. ``workers`` processes (0 = all
    cores) read images and propose while the detector runs ``batch_size`` images per step.
    ``category_ids[k - 1]`` is the category id of class k (default k). ``model_fingerprint``
    identifies the checkpoint, so a resume with another model is refused.
    """
    start = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = all cores), got {workers}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    class_names = list(detector.class_names)
    category_ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
    if len(category_ids) != len(class_names):
        raise ValueError(f"{len(category_ids)} category ids for {len(class_names)} classes")
    proposal_settings = dict(proposal_settings or {})
    workers = workers or os.cpu_count() or 1
    output_dir = Path(output_dir)
    partial_dir = output_dir / "partial"
    vis_dir = output_dir / "vis"

    paths = find_inputs(inputs, exclude=output_dir)
    files = [str(p) for p in paths]
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {inputs}")
    common_root = os.path.commonpath([str(p.parent) for p in paths])

    store = store_ids = None
    if proposal_store is not None:
        from detect.proposals import ProposalStore

        store = ProposalStore(proposal_store)
        store_ids = _store_ids(store, files)
    elif propose_fn is None:
        propose_fn = _default_propose_fn()

    partial_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(partial_dir / "settings.json", {
        "score_threshold": score_threshold, "class_names": class_names,
        "category_ids": category_ids, "model": model_fingerprint,
        "proposals": ({"store": str(Path(proposal_store).resolve())} if proposal_store is not None
                      else proposal_settings)})
    done, _, _ = _load_results(partial_dir)
    mine = [i for i in range(len(files)) if i % world_size == rank]
    todo = [i for i in mine if files[i] not in done]
    num_skipped = len(mine) - len(todo)
    if num_skipped:
        print(f"detect predict: resuming: {num_skipped} image(s) already done in {output_dir}",
              file=sys.stderr)

    def merge() -> dict[str, int]:
        return write_outputs(output_dir, files, class_names=class_names, category_ids=category_ids)

    journal_name = "done.jsonl" if world_size == 1 else f"done.rank{rank}.jsonl"
    timer = StageTimer(detector.device)  # main-process stages: wait, the detector's, visualize
    worker_ms = {"read_in_workers": 0.0, "proposals_in_workers": 0.0}  # summed over workers
    window = batch_size + 2 * workers  # images read/proposed ahead of the detector
    pending: collections.deque[tuple[int, Future]] = collections.deque()  # (index, Loaded)
    next_todo = 0
    since_merge, last_merge = 0, time.perf_counter()

    def submit_more(pool: ProcessPoolExecutor) -> None:
        nonlocal next_todo
        while next_todo < len(todo) and len(pending) < window:
            i = todo[next_todo]
            pending.append((i, pool.submit(_load_and_propose, i, files[i],
                                           None if store is not None else propose_fn,
                                           proposal_settings)))
            next_todo += 1

    bar = tqdm(total=len(todo), unit="img", desc="predict", disable=not progress or None,
               dynamic_ncols=True, file=sys.stderr)
    # Fork the workers while this process's OpenCV thread pool is stopped: a forked worker whose
    # parent had the pool running (e.g. after make-synthetic or selective search in the same
    # process, as `detect demo` does) hangs forever in cv2.setNumThreads (_init_worker).
    import cv2

    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    pool = ProcessPoolExecutor(max_workers=min(workers, max(len(todo), 1)),
                               mp_context=_mp_context(), initializer=_init_worker)
    journal = _open_journal(partial_dir / journal_name)
    try:
        submit_more(pool)
        while pending:
            batch = []
            while pending and len(batch) < batch_size:
                try:
                    with timer("wait"):  # the detector waiting for the workers
                        loaded = pending[0][1].result()
                except BrokenProcessPool:
                    in_flight = ", ".join(files[i] for i, _ in pending)
                    raise RuntimeError(
                        f"a worker process died (killed for lack of memory?) while reading or "
                        f"proposing one of: {in_flight}; finished images are kept in "
                        f"{partial_dir}, re-run to resume") from None
                pending.popleft()
                worker_ms["read_in_workers"] += loaded.read_ms
                worker_ms["proposals_in_workers"] += loaded.propose_ms
                batch.append(loaded)
                submit_more(pool)
            for index, image, proposals, error, _, _ in batch:
                file = files[index]
                if not error:
                    if store is not None:
                        proposals = store.get(store_ids[file])  # [R, 4] xyxy
                    record, error = _detect_one(detector, file, image, proposals, score_threshold, timer)
                if error:
                    record = {"file": file, "error": error}
                journal.write(json.dumps(record) + "\n")
                journal.flush()
                if visualize and "error" not in record:
                    with timer("visualize"):
                        _write_visualisation(vis_dir, safe_relative_name(file, common_root),
                                             image, record, class_names)
                bar.update(1)
            since_merge += len(batch)
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
    name = "summary.json" if world_size == 1 else f"summary.rank{rank}.json"
    write_json_atomic(output_dir / name, asdict(summary))
    return summary


def _detect_one(detector: Detector, file: str, image: np.ndarray, proposals: np.ndarray,
                score_threshold: float, timer: StageTimer) -> tuple[dict | None, str]:
    """Run the detector on one image -> (journal record, "") or (None, reason) on GPU OOM."""
    if len(proposals) == 0:  # nothing to score (e.g. a tiny image): no detections
        return _record(file, image, Detections.empty(), score_threshold), ""
    try:
        dets = detector.detect(image, proposals, timer=timer)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, (f"out of GPU memory ({image.shape[1]}x{image.shape[0]} image, "
                      f"{len(proposals)} proposals)")
    return _record(file, image, dets, score_threshold), ""


def cli_predict(args) -> int:
    """``detect predict``: load the checkpoint, run ``predict``, print where the outputs are.

    Under ``torchrun`` (env RANK / WORLD_SIZE) each rank takes its share of the images on GPU
    LOCAL_RANK; no process group is needed (ranks meet only in the journal merge).
    """
    from detect.inference import load_detector

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    stat = checkpoint.stat()
    detector = load_detector(checkpoint, args.device)  # '' = cuda if available, else cpu
    workers = args.workers
    if workers == 0 and world_size > 1:  # share the node's cores between its ranks
        workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    summary = predict(
        detector, args.input, args.output_dir, score_threshold=args.score_threshold,
        proposal_settings=detector.proposal_settings, workers=workers,
        batch_size=args.batch_size, proposal_store=args.proposals or None,
        visualize=args.visualize, category_ids=getattr(detector, "category_ids", None),
        rank=rank, world_size=world_size,
        model_fingerprint=f"{checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    print(f"detect predict: {summary.num_images} image(s), {summary.num_detections} detection(s) "
          f">= {args.score_threshold}, {summary.num_errors} error(s) (see errors.json); "
          f"{summary.images_per_s:.2f} images/s on {summary.device}; outputs in {args.output_dir}",
          file=sys.stderr)
    return 0
