"""R-CNN's per-class linear SVMs with hard-negative mining ([RCNN] code ``rcnn_train.m``).

numpy and scikit-learn only: the worker processes read the memory-mapped ``FeatureCache``
themselves. Shapes: as in ``detect.training.feature_cache``.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from detect.common.fileio import atomic_path, check_settings, read_json, write_settings
from detect.training.feature_cache import FeatureCache, FeatureSource


@dataclass
class ClassSVM:
    weight: np.ndarray  # [D] float32, in the scaled feature space (features x feat_scale)
    bias: float
    stats: dict = field(default_factory=dict)


class _MiningCache:
    """One class's training cache: positives, the current negatives and the current model."""

    def __init__(self, x_pos: np.ndarray, dim: int):
        self.x_pos = x_pos  # [P, D] scaled
        self.neg_chunks: list[np.ndarray] = []
        self.key_chunks: list[np.ndarray] = []
        self.x_neg = np.zeros((0, dim), np.float32)
        self.keys = np.zeros(0, np.int64)
        self.weight = np.zeros(dim, np.float32)
        self.bias = 0.0  # w = 0: every negative of the first image is "hard" ([RCNN]: first_time)
        self.num_added = self.hard_added = self.retrains = 0  # retrains 0: untrained
        self.seconds = 0.0
        self.objective = float("nan")

    def scores(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias

    def add(self, x: np.ndarray, keys: np.ndarray, *, dedupe: bool) -> None:
        if dedupe:  # a later pass: drop negatives already cached
            new = ~np.isin(keys, np.concatenate([self.keys] + self.key_chunks))
            x, keys = x[new], keys[new]
        if keys.size:
            self.neg_chunks.append(x)
            self.key_chunks.append(keys)
            self.num_added += int(keys.size)
            self.hard_added += int(keys.size)

    def retrain(self, *, C: float, pos_weight: float, intercept_scaling: float, evict_thresh: float) -> None:
        self.x_neg = np.concatenate([self.x_neg] + self.neg_chunks)
        self.keys = np.concatenate([self.keys] + self.key_chunks)
        self.neg_chunks, self.key_chunks = [], []
        x = np.concatenate([self.x_pos, self.x_neg])
        y = np.concatenate([np.ones(len(self.x_pos)), -np.ones(len(self.x_neg))])
        # liblinear -s 3 (L2-regularised L1-loss, dual) -w1 2 -c 0.001 -B 10, as [RCNN] update_model;
        # tol 1e-4 is tighter than liblinear's default 0.1, so retrains agree to more digits.
        svm = LinearSVC(C=C, loss="hinge", dual=True, class_weight={1: pos_weight, -1: 1.0},
                        intercept_scaling=intercept_scaling, tol=1e-4, max_iter=20000, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: the objective is logged instead
            svm.fit(x, y)
        self.weight = svm.coef_[0].astype(np.float32)
        self.bias = float(svm.intercept_[0])
        self.num_added = 0
        self.retrains += 1
        z_pos, z_neg = self.scores(self.x_pos), self.scores(self.x_neg)
        self.objective = float(C * pos_weight * np.maximum(0, 1 - z_pos).sum() + C * np.maximum(0, 1 + z_neg).sum()
                               + 0.5 * self.weight @ self.weight + 0.5 * (self.bias / intercept_scaling) ** 2)
        keep = z_neg >= evict_thresh  # evict easy negatives ([RCNN]: z < -1.2)
        self.x_neg, self.keys = self.x_neg[keep], self.keys[keep]


def mine_svms(source: FeatureSource, classes: list[int], *, feat_scale: float, C: float = 0.001,
              pos_weight: float = 2.0, intercept_scaling: float = 10.0, neg_iou: float = 0.3,
              hard_thresh: float = -1.0001, evict_thresh: float = -1.2, retrain_limit: int = 2000,
              passes: int = 1, progress: bool = False) -> dict[int, ClassSVM]:
    """Train one linear SVM per class in ``classes`` (1..K) with hard-negative mining.

    Positives: the class's gt rows; negatives: rows with IoU < ``neg_iou`` with all its gt. From
    w = 0, each image adds its uncached negatives scoring above ``hard_thresh``; the SVM is
    retrained after the first image, after ``retrain_limit`` more and at the end, each time
    evicting negatives below ``evict_thresh``. Features are multiplied by ``feat_scale``.
    """
    t_start = time.perf_counter()
    cols = np.asarray(classes, np.int64) - 1
    dim = source.fc7_dim
    pos: dict[int, list[np.ndarray]] = {k: [np.zeros((0, dim), np.float32)] for k in classes}
    for i in range(source.num_images):
        rows = source.rows(i)
        gt_rows = np.flatnonzero(np.isin(rows.gt_classes, classes))
        if gt_rows.size:
            x = source.fc7(i, gt_rows) * feat_scale
            for k in classes:
                pos[k].append(x[rows.gt_classes[gt_rows] == k])
    caches = {k: _MiningCache(np.concatenate(pos[k]), dim) for k in classes}
    mining = [k for k in classes if len(caches[k].x_pos)]
    for k in sorted(set(classes) - set(mining)):
        warnings.warn(f"R-CNN SVM: class {k} has no ground-truth boxes in the training set; it will never fire")
    fit = dict(C=C, pos_weight=pos_weight, intercept_scaling=intercept_scaling, evict_thresh=evict_thresh)

    bar = tqdm(total=passes * source.num_images, desc=f"svm {classes if len(classes) < 4 else len(classes)}",
               unit="img", disable=not progress or not mining, dynamic_ncols=True)
    for p in range(passes):
        for i in range(source.num_images):
            bar.update(1)
            rows = source.rows(i)
            is_neg = rows.overlaps[:, cols] < neg_iou  # [R, len(classes)]
            need = np.flatnonzero(is_neg.any(axis=1))
            if need.size == 0 or not mining:
                continue
            x = source.fc7(i, need) * feat_scale  # [n, D]
            for c, k in enumerate(classes):
                if k not in mining:
                    continue
                t0 = time.perf_counter()
                cache = caches[k]
                hard = is_neg[need, c] & (cache.scores(x) > hard_thresh)
                cache.add(x[hard], i * (1 << 32) + need[hard].astype(np.int64), dedupe=p > 0)
                if (not cache.retrains and cache.num_added) or cache.num_added > retrain_limit:
                    cache.retrain(**fit)
                cache.seconds += time.perf_counter() - t0
    bar.close()
    out = {}
    for k in classes:
        cache = caches[k]
        if k in mining and cache.num_added:  # (an untrained cache has no negatives but the added ones)
            t0 = time.perf_counter()
            cache.retrain(**fit)
            cache.seconds += time.perf_counter() - t0
        if k in mining and not cache.retrains:
            warnings.warn(f"R-CNN SVM: class {k} has no negatives to train against; it will never fire")
        # untrained (no positives, or no negatives at all): w = 0 and a bias that never fires
        out[k] = ClassSVM(cache.weight, cache.bias if cache.retrains else -10.0, {
            "num_pos": len(cache.x_pos), "num_neg_cached": len(cache.x_neg), "hard_negatives_added": cache.hard_added,
            "retrains": cache.retrains, "objective": cache.objective, "train_seconds": round(cache.seconds, 3),
            "wall_seconds": round(time.perf_counter() - t_start, 3)})
    return out


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _class_files(svm_dir: Path, k: int) -> tuple[Path, Path]:
    return svm_dir / f"class_{k:03d}.npz", svm_dir / f"class_{k:03d}.json"


def _load_class(svm_dir: Path, k: int, settings: dict) -> ClassSVM | None:
    """Class k's finished SVM, None when not trained yet; an error when trained with other settings."""
    npz, meta = _class_files(svm_dir, k)
    hint = f"delete {svm_dir} to retrain the SVMs with these settings, or use another --output-dir"
    if not (npz.is_file() and check_settings(meta, settings, hint=hint)):
        return None
    arrays = load_arrays(npz)
    return ClassSVM(arrays["weight"], float(arrays["bias"]), read_json(meta)["stats"])


def _save_class(svm_dir: Path, k: int, svm: ClassSVM, settings: dict) -> None:
    npz, meta = _class_files(svm_dir, k)
    save_arrays(npz, weight=svm.weight, bias=np.float32(svm.bias))
    write_settings(meta, settings, **{"class": k, "stats": svm.stats})


def _svm_worker(cache_dir: str, svm_dir: str, k: int, settings: dict) -> int:
    """One class in a worker process: read the memory-mapped cache, mine, save the class."""
    with threadpool_limits(1):
        svm = mine_svms(FeatureCache(cache_dir), [k], **settings)[k]
    _save_class(Path(svm_dir), k, svm, settings)
    return k


def train_svms(source: FeatureSource, svm_dir: str | os.PathLike, *, num_classes: int, workers: int = 0,
               progress: bool = True, **settings) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train (or resume: each class is saved as ``class_KKK.npz`` + ``.json``) the K class SVMs,
    from a ``FeatureCache`` in ``workers`` processes (0 = all cores), else here; ``settings`` are
    ``mine_svms``' keywords. Returns weight [K, D], bias [K] and per-class stats."""
    svm_dir = Path(svm_dir)
    svm_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in settings.items()}
    results = {k: r for k in range(1, num_classes + 1) if (r := _load_class(svm_dir, k, settings)) is not None}
    todo = [k for k in range(1, num_classes + 1) if k not in results]
    workers = min(workers or os.cpu_count() or 1, len(todo))
    if todo and isinstance(source, FeatureCache) and workers > 1:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(_svm_worker, str(source.path), str(svm_dir), k, settings) for k in todo]
            for fut in tqdm(futures, desc="svm classes", unit="class", disable=not progress, dynamic_ncols=True):
                k = fut.result()
                results[k] = _load_class(svm_dir, k, settings)
    elif todo:
        groups = [[k] for k in todo] if isinstance(source, FeatureCache) else [todo]
        for group in groups:
            for k, svm in mine_svms(source, group, progress=progress, **settings).items():
                _save_class(svm_dir, k, svm, settings)
                results[k] = svm
    weight = np.stack([results[k].weight for k in range(1, num_classes + 1)]).astype(np.float32)  # [K, D]
    bias = np.asarray([results[k].bias for k in range(1, num_classes + 1)], np.float32)  # [K]
    stats = {str(k): results[k].stats for k in range(1, num_classes + 1)}
    return weight, bias, stats
