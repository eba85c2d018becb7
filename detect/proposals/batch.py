"""Selective search over many images into one store: a process pool, resumable chunks, shards.

Work goes into ``<out>.partial/`` as chunk files of ``chunk_size`` images in input order, each
written atomically; a re-run skips finished chunks, and once all exist they are merged into the
store (``detect.proposals.store``). A killed and re-run job, or one split into shards
(``shard=(i, N)`` computes chunks k with k % N == i), gives the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numba
import numpy as np
from tqdm import tqdm

from detect import __version__
from detect.common.config import check_proposal_settings
from detect.common.fileio import atomic_path, start_or_resume
from detect.common.cpus import available_cores
from detect.data.images import ImageReadError, read_image
from detect.proposals.selective_search import selective_search
from detect.proposals.store import ProposalStore, dataset_fingerprint, write_store

DEFAULT_CHUNK_SIZE = 256  # images per chunk file of a run in progress (DETECT_PROPOSAL_CHUNK)


def parse_shard(text: str) -> tuple[int, int] | None:
    """``--shard i/N`` as (i, N); None for ""."""
    if not text:
        return None
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r}: needs 0 <= i < N")
    return i, n


def generate_proposals(items: list[tuple[int, str]], out_dir: str | os.PathLike, *, settings: dict,
                       workers: int = 0, shard: tuple[int, int] | None = None, progress: bool = True,
                       chunk_size: int = DEFAULT_CHUNK_SIZE, merge: bool = True) -> ProposalStore | None:
    """Selective search on every ``(image_id, path)`` of ``items`` into the store ``out_dir``
    (returned as is if already there with the same images and settings). ``settings``:
    ``ProposalConfig`` as a dict. ``workers`` processes (0 = all cores; 1 = in this process).
    ValueError if every image fails. None while chunks are missing (other shards' work) or with ``merge=False``."""
    out = Path(out_dir)
    settings = check_proposal_settings(settings)
    items = [(int(image_id), str(path)) for image_id, path in items]
    ids, counts = np.unique(np.array([i for i, _ in items], dtype=np.int64), return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"proposals for {out}: image ids listed twice: {ids[counts > 1][:5].tolist()}")
    if chunk_size < 1:
        raise ValueError(f"proposals: chunk_size must be >= 1, got {chunk_size}")
    versions = {"code_version": __version__, "opencv_version": cv2.__version__, "numba_version": numba.__version__}
    meta = {**settings, **versions, "dataset_fingerprint": dataset_fingerprint(items)}
    partial = Path(f"{out}.partial")
    if out.exists():
        store = _existing_store(out, meta, len(items))
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed between its merge and this cleanup
        return store

    start_or_resume(partial / "job.json", {**meta, "num_images": len(items), "chunk_size": chunk_size},
                    hint=f"delete {partial} to start over, or re-run with the same inputs and settings")
    num_chunks = math.ceil(len(items) / chunk_size)
    mine = [k for k in range(num_chunks) if shard is None or k % shard[1] == shard[0]]
    todo = [k for k in mine if not _chunk_path(partial, k).is_file()]
    if todo and len(todo) < len(mine):
        print(f"proposals: resuming {partial}: {len(mine) - len(todo)} of {len(mine)} chunks already done",
              file=sys.stderr)
    _compute_chunks(items, todo, partial, settings, workers=workers, chunk_size=chunk_size, progress=progress,
                    desc="proposals" if shard is None else f"proposals {shard[0]}/{shard[1]}")

    missing = sum(not _chunk_path(partial, k).is_file() for k in range(num_chunks))
    if missing and merge:
        print(f"proposals: this shard is done; {missing} of {num_chunks} chunks in {partial} are other "
              f"shards' work. The last shard to finish merges them into {out} (or re-run without "
              f"--shard once all shards are done).", file=sys.stderr)
    if missing or not merge:
        return None
    return _merge_chunks(items, partial, out, meta, num_chunks=num_chunks, chunk_size=chunk_size)


def _existing_store(out: Path, meta: dict, num_images: int) -> ProposalStore:
    """The finished store ``out``, if it holds the images and settings of ``meta`` (any versions)."""
    store = ProposalStore(out)
    expected = {**{k: v for k, v in meta.items() if not k.endswith("_version")}, "num_images": num_images}
    differ = [k for k, v in expected.items() if store.meta.get(k) != v]
    if differ:
        shown = ", ".join(f"{k}: store {store.meta.get(k)!r}, asked {expected[k]!r}" for k in differ)
        raise ValueError(f"{out}: a proposal store for other images or settings is already there ({shown}); "
                         f"delete it or choose another output folder")
    print(f"proposals: {out} is already complete ({len(store)} images)", file=sys.stderr)
    return store


def _chunk_path(partial: Path, k: int) -> Path:
    return partial / f"chunk_{k:06d}.npz"


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core: OpenCV's own threads would only compete


def _propose_file(task: tuple[str, dict]) -> tuple[np.ndarray, np.ndarray, str]:
    """Worker task (path, settings) -> (boxes [R, 4], ranking values [R], failure reason or "")."""
    path, settings = task
    try:
        return (*selective_search(read_image(path), **settings, return_scores=True), "")
    except Exception as e:  # noqa: BLE001 -- one bad image must not stop a 100k-image run
        reason = e.reason if isinstance(e, ImageReadError) else f"{type(e).__name__}: {e}"
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), reason


def _compute_chunks(items: list[tuple[int, str]], todo: list[int], partial: Path, settings: dict, *,
                    workers: int, chunk_size: int, progress: bool, desc: str) -> None:
    """Propose the images of chunks ``todo`` and write one chunk file per chunk, in order."""
    chunks = [items[k * chunk_size:(k + 1) * chunk_size] for k in todo]
    tasks = [(path, settings) for chunk in chunks for _, path in chunk]
    if not tasks:
        return
    num_workers = max(1, min(workers if workers > 0 else available_cores(), len(tasks)))
    with tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:
        if num_workers == 1:
            _write_chunks(todo, chunks, map(_propose_file, tasks), partial, bar)
            return
        # spawn: workers start clean (no inherited OpenCV/torch thread state). An executor, not a
        # Pool: a dead worker raises BrokenProcessPool where Pool.imap would wait forever.
        pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker)
        try:  # one image (~1 s) per task keeps every worker busy to the end
            _write_chunks(todo, chunks, pool.map(_propose_file, tasks, chunksize=1), partial, bar)
        except BrokenProcessPool:
            raise ValueError(f"proposals: a worker process died (out of memory, or a crash inside "
                             f"OpenCV); finished chunks are kept in {partial}. Re-run to resume, "
                             f"with fewer --workers if memory is short") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on an error, drop the queued images


def _write_chunks(todo: list[int], chunks: list[list[tuple[int, str]]],
                  results: Iterator[tuple[np.ndarray, np.ndarray, str]], partial: Path, bar: tqdm) -> None:
    for k, chunk in zip(todo, chunks):
        done = []
        for _ in chunk:
            done.append(next(results))
            bar.update(1)
        boxes, scores, reasons = zip(*done)
        with atomic_path(_chunk_path(partial, k)) as tmp, open(tmp, "wb") as f:
            np.savez(f, image_ids=np.array([i for i, _ in chunk], dtype=np.int64),  # [n]
                     counts=np.array([len(b) for b in boxes], dtype=np.int64),  # [n]
                     boxes=np.concatenate([np.zeros((0, 4), np.float32), *boxes]),  # [sum, 4]
                     scores=np.concatenate([np.zeros(0, np.float32), *scores]),  # [sum]
                     reasons=np.array(reasons, dtype=str))  # [n], "" for the images that worked


def _read_chunk(partial: Path, k: int, chunk: list[tuple[int, str]], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of chunk file k, checked against the chunk's (image_id, path) list."""
    path = _chunk_path(partial, k)
    try:
        with np.load(path, allow_pickle=False) as z:  # an npz reads only the arrays asked for
            data = {key: z[key] for key in ("image_ids", "counts", *keys)}
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"{path}: unreadable chunk ({e}); delete it and re-run to redo it") from None
    if data["image_ids"].tolist() != [i for i, _ in chunk] or (
            "boxes" in data and data["counts"].sum() != len(data["boxes"])):
        raise ValueError(f"{path}: holds other images than chunk {k} of this run; delete {partial} and re-run")
    return data


def _merge_chunks(items: list[tuple[int, str]], partial: Path, out: Path, meta: dict, *,
                  num_chunks: int, chunk_size: int) -> ProposalStore:
    """Stream all chunk files, in order, into the store ``out``; remove ``partial``."""
    chunks = [items[k * chunk_size:(k + 1) * chunk_size] for k in range(num_chunks)]

    def boxes_stream() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for k, chunk in enumerate(chunks):
            data = _read_chunk(partial, k, chunk, ("boxes", "scores"))
            splits = np.cumsum(data["counts"])[:-1]
            yield from zip(np.split(data["boxes"], splits), np.split(data["scores"], splits))

    try:
        failures = []
        for k, chunk in enumerate(chunks):
            reasons = _read_chunk(partial, k, chunk, ("reasons",))["reasons"].tolist()
            failures += [{"image_id": i, "file": path, "reason": r} for (i, path), r in zip(chunk, reasons) if r]
        if items and len(failures) == len(items):  # a wrong image folder, not bad images
            shutil.rmtree(partial, ignore_errors=True)
            first = failures[0]
            raise ValueError(f"proposals: all {len(items)} images failed, e.g. {first['file']}: "
                             f"{first['reason']}; check the image paths (--images); no store written")
        write_store(out, image_ids=[i for i, _ in items], boxes_per_image=boxes_stream(), with_scores=True,
                    meta={**meta, "failures": failures}, files=[p for _, p in items], scratch_dir=partial)
    except (FileExistsError, ValueError):  # another shard merged first: the same bytes
        if not (out / "meta.json").is_file():
            raise
        return _existing_store(out, meta, len(items))
    shutil.rmtree(partial, ignore_errors=True)
    if failures:
        shown = "; ".join(f"id {f['image_id']} {f['file']}: {f['reason']}" for f in failures[:3])
        print(f"proposals: {len(failures)} of {len(items)} images failed and have no proposals "
              f"(listed in {out / 'meta.json'}): {shown}{' ...' if len(failures) > 3 else ''}", file=sys.stderr)
    return ProposalStore(out)
