"""R-CNN's feature cache, per-class linear SVMs with hard-negative mining, and box ridge regression.

numpy and scikit-learn only (no torch at import): the SVM worker processes start fast and read
the memory-mapped cache themselves. ``detect.rcnn`` computes the features and wires the stages.

Shapes: R rows of one image (its ground-truth boxes, then its proposals), K object classes,
D fc7 width (SVM features), D5 flattened pool5 width (box-regression features).

Feature cache (one folder, written by ``detect.rcnn.extract_features``)::

    meta.json                 {"format": "detect-rcnn-features", "version", "num_images",
                               "images_per_shard", "num_shards", "fc7_dim", "pool5_dim",
                               "num_classes", "bbox_min_iou", "image_ids"}
    shard_00000/              images [0, images_per_shard) of the dataset, in dataset order
        fc7.f16               raw little-endian float16 [rows, D], every row of every image
        pool5.f16             raw float16 [P, D5], only rows with best IoU >= bbox_min_iou
        index.npy             int64 [images, 3]: (image_id, first row, number of rows)
        rows.npz              per-row arrays of ImageRows (below) + pool5_index [rows] int32
                              (row of pool5.f16, -1 when the row has no pool5)
        meta.json             counts and dims of this shard
    done                      written last

A shard folder is built under a temporary name and renamed into place, so a shard either exists
whole or not at all; a resumed run skips existing shards. Ranks write disjoint shards.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from detect.io import atomic_path, read_json, write_json_atomic

FEATURE_FORMAT = "detect-rcnn-features"
FEATURE_VERSION = 1
_ROW_FIELDS = ("boxes", "gt_classes", "overlaps", "best_iou", "best_classes", "best_gt_boxes", "has_pool5")


@dataclass
class ImageRows:
    """What R-CNN's later stages need to know about each row (region) of one image."""

    image_id: int
    boxes: np.ndarray  # [R, 4] float32 xyxy: the image's (non-difficult) gt boxes, then proposals
    gt_classes: np.ndarray  # [R] int16: class 1..K of a ground-truth row, 0 for a proposal
    overlaps: np.ndarray  # [R, K] float32: IoU with the closest gt box of each class (any gt)
    best_iou: np.ndarray  # [R] float32: IoU with the best-overlapping non-difficult gt box
    best_classes: np.ndarray  # [R] int16: that gt box's class (0 when the image has none)
    best_gt_boxes: np.ndarray  # [R, 4] float32: that gt box (zeros when none)
    has_pool5: np.ndarray  # [R] bool: best_iou >= bbox_min_iou, i.e. used by box regression

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


class FeatureSource(Protocol):
    """Per-image rows and their features: the on-disk ``FeatureCache`` or a streaming source
    that recomputes features with the network (``detect.rcnn.StreamingFeatures``)."""

    num_images: int
    fc7_dim: int  # D
    pool5_dim: int  # D5

    def rows(self, i: int) -> ImageRows: ...

    def fc7(self, i: int, rows: np.ndarray) -> np.ndarray: ...  # [len(rows), D] float32

    def pool5(self, i: int, rows: np.ndarray) -> np.ndarray: ...  # [len(rows), D5] float32


# ----------------------------------------------------------------------------------------------
# Feature cache: writer and reader
# ----------------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


class ShardWriter:
    """Appends images' rows and features to one shard; ``close()`` publishes it atomically."""

    def __init__(self, cache_dir: str | os.PathLike, shard_index: int, *, fc7_dim: int, pool5_dim: int):
        self.final = Path(cache_dir) / shard_name(shard_index)
        for stale in Path(cache_dir).glob(f".{shard_name(shard_index)}.tmp*"):  # a killed run's
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(cache_dir) / f".{shard_name(shard_index)}.tmp{os.getpid()}"
        self.tmp.mkdir(parents=True)
        self.fc7_dim, self.pool5_dim = fc7_dim, pool5_dim
        self._fc7 = open(self.tmp / "fc7.f16", "wb")
        self._pool5 = open(self.tmp / "pool5.f16", "wb")
        self._index: list[tuple[int, int, int]] = []
        self._rows: dict[str, list[np.ndarray]] = {k: [] for k in _ROW_FIELDS + ("pool5_index",)}
        self._num_rows = self._num_pool5 = 0

    def add(self, rows: ImageRows, fc7: np.ndarray, pool5: np.ndarray) -> None:
        """``fc7`` [R, D] for every row; ``pool5`` [P, D5] for the rows with ``has_pool5``."""
        n, p = len(rows), int(rows.has_pool5.sum())
        if fc7.shape != (n, self.fc7_dim) or pool5.shape != (p, self.pool5_dim):
            raise ValueError(f"image {rows.image_id}: fc7 {fc7.shape} / pool5 {pool5.shape} do not match "
                             f"{n} rows ({p} with pool5) of dims {self.fc7_dim} / {self.pool5_dim}")
        self._fc7.write(np.ascontiguousarray(fc7, dtype="<f2").tobytes())
        self._pool5.write(np.ascontiguousarray(pool5, dtype="<f2").tobytes())
        for k in _ROW_FIELDS:
            self._rows[k].append(getattr(rows, k))
        pool5_index = np.full(n, -1, np.int32)
        pool5_index[rows.has_pool5] = self._num_pool5 + np.arange(p, dtype=np.int32)
        self._rows["pool5_index"].append(pool5_index)
        self._index.append((rows.image_id, self._num_rows, n))
        self._num_rows += n
        self._num_pool5 += p

    def close(self) -> Path:
        for f in (self._fc7, self._pool5):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        np.save(self.tmp / "index.npy", np.asarray(self._index, np.int64).reshape(-1, 3))
        np.savez(self.tmp / "rows.npz", **{k: np.concatenate(v) if v else np.zeros(0) for k, v in self._rows.items()})
        write_json_atomic(self.tmp / "meta.json", {
            "num_images": len(self._index), "num_rows": self._num_rows, "num_pool5": self._num_pool5,
            "fc7_dim": self.fc7_dim, "pool5_dim": self.pool5_dim})
        os.replace(self.tmp, self.final)
        return self.final


class FeatureCache:
    """Reads the cache folder described in the module docstring. Implements ``FeatureSource``.

    Image ``i`` is the i-th image of the dataset the cache was made from. Features come back as
    float32 copies of the memory-mapped rows asked for; only those rows are read from disk.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta = read_json(self.path / "meta.json")
        if meta.get("format") != FEATURE_FORMAT:
            raise ValueError(f"{self.path / 'meta.json'}: not an R-CNN feature cache (format {meta.get('format')!r})")
        self.meta = meta
        self.num_images = int(meta["num_images"])
        self.images_per_shard = int(meta["images_per_shard"])
        self.fc7_dim, self.pool5_dim = int(meta["fc7_dim"]), int(meta["pool5_dim"])
        self.image_ids = [int(i) for i in meta["image_ids"]]
        self._shard_index = -1
        self._shard: dict = {}

    def _open_shard(self, k: int) -> dict:
        if k == self._shard_index:
            return self._shard
        folder = self.path / shard_name(k)
        meta = read_json(folder / "meta.json")
        shard = {"index": np.load(folder / "index.npy", allow_pickle=False)}
        with np.load(folder / "rows.npz", allow_pickle=False) as z:
            shard.update({name: z[name] for name in z.files})
        for name, rows, dim in (("fc7", meta["num_rows"], self.fc7_dim), ("pool5", meta["num_pool5"], self.pool5_dim)):
            file = folder / f"{name}.f16"
            expected = rows * dim * 2
            if not file.is_file() or file.stat().st_size != expected:
                size = file.stat().st_size if file.is_file() else "missing"
                raise ValueError(f"{file}: expected {expected} bytes ({rows} rows x {dim} float16), found {size}")
            shard[name] = (np.memmap(file, dtype="<f2", mode="r", shape=(rows, dim)) if rows
                           else np.zeros((0, dim), np.float16))
        self._shard_index, self._shard = k, shard
        return shard

    def _locate(self, i: int) -> tuple[dict, int, int]:
        if not 0 <= i < self.num_images:
            raise IndexError(f"{self.path}: image index {i} out of range [0, {self.num_images})")
        shard = self._open_shard(i // self.images_per_shard)
        _, start, count = shard["index"][i % self.images_per_shard]
        return shard, int(start), int(count)

    def rows(self, i: int) -> ImageRows:
        shard, start, count = self._locate(i)
        sl = slice(start, start + count)
        return ImageRows(image_id=int(shard["index"][i % self.images_per_shard, 0]),
                         **{k: shard[k][sl] for k in _ROW_FIELDS})

    def fc7(self, i: int, rows: np.ndarray) -> np.ndarray:
        shard, start, _ = self._locate(i)
        return np.asarray(shard["fc7"][start + np.asarray(rows, np.int64)], np.float32)

    def pool5(self, i: int, rows: np.ndarray) -> np.ndarray:
        shard, start, _ = self._locate(i)
        where = shard["pool5_index"][start + np.asarray(rows, np.int64)]
        if (where < 0).any():
            raise ValueError(f"{self.path}: image {i}: pool5 was cached only for rows with IoU >= "
                             f"{self.meta['bbox_min_iou']}")
        return np.asarray(shard["pool5"][where], np.float32)


def feature_cache_bytes(cache_dir: str | Path) -> dict:
    """Bytes on disk of a feature cache, in total and per image (fc7, pool5, row metadata)."""
    cache = FeatureCache(cache_dir)
    parts = {"fc7": 0, "pool5": 0, "rows": 0}
    for shard in sorted(Path(cache_dir).glob("shard_*")):
        for f in shard.iterdir():
            key = "fc7" if f.name == "fc7.f16" else "pool5" if f.name == "pool5.f16" else "rows"
            parts[key] += f.stat().st_size
    total = sum(parts.values())
    n = max(cache.num_images, 1)
    return {"total": total, "per_image": total / n, **{f"{k}_per_image": v / n for k, v in parts.items()}}


# ----------------------------------------------------------------------------------------------
# Feature scaling ([RCNN] rcnn_feature_stats.m / rcnn_scale_features.m)
# ----------------------------------------------------------------------------------------------


def mean_feature_norm(source: FeatureSource, layer: str, *, max_images: int = 200,
                      rows_per_image: int = 200, seed: int = 0) -> float:
    """Mean L2 norm of ``layer`` ("fc7" or "pool5") features over a seeded sample of rows.

    [RCNN] sampled 200 boxes from each of 200 random training images; features are then scaled
    by ``20 / mean_norm``. pool5 is sampled among the rows that have pool5 (IoU >= 0.6).
    """
    rng = np.random.default_rng(seed)
    images = rng.permutation(source.num_images)[:max_images]
    norms = []
    for i in sorted(images.tolist()):
        rows = source.rows(i)
        pool = np.arange(len(rows)) if layer == "fc7" else np.flatnonzero(rows.has_pool5)
        if pool.size == 0:
            continue
        pick = np.sort(rng.permutation(pool)[:rows_per_image])
        feats = source.fc7(i, pick) if layer == "fc7" else source.pool5(i, pick)
        norms.append(np.linalg.norm(feats.astype(np.float64), axis=1))
    if not norms:
        raise ValueError(f"no {layer} features to measure (no proposals or ground truth in the training set?)")
    mean = float(np.concatenate(norms).mean())
    if not mean > 0:
        raise ValueError(f"{layer} features are all zero: the network gives no signal")
    return mean


# ----------------------------------------------------------------------------------------------
# SVMs with hard-negative mining ([RCNN] rcnn_train.m)
# ----------------------------------------------------------------------------------------------


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
        self.trained = False
        self.num_added = self.hard_added = self.retrains = 0
        self.seconds = 0.0
        self.objective = float("nan")

    def scores(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias

    def add(self, x: np.ndarray, keys: np.ndarray, *, dedupe: bool) -> None:
        if dedupe:  # a later pass: drop negatives already cached
            seen = np.concatenate([self.keys] + self.key_chunks)
            new = ~np.isin(keys, seen)
            x, keys = x[new], keys[new]
        if keys.size:
            self.neg_chunks.append(x)
            self.key_chunks.append(keys)
            self.num_added += int(keys.size)
            self.hard_added += int(keys.size)

    def retrain(self, *, C: float, pos_weight: float, intercept_scaling: float, evict_thresh: float) -> None:
        from sklearn.svm import LinearSVC

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
        self.trained, self.num_added = True, 0
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

    Defaults from [RCNN] rcnn_train.m. Positives: the ground-truth rows of the class. Negatives:
    rows whose IoU with every gt box of the class is below ``neg_iou``. Starting from w = 0 (so
    the first image contributes all its negatives), each image adds its negatives scoring above
    ``hard_thresh`` that are not cached yet; the SVM is retrained after the first image, whenever
    more than ``retrain_limit`` negatives were added, and at the end; after each retrain,
    negatives scoring below ``evict_thresh`` leave the cache. Since negatives below -1 carry no
    hinge loss, the result approaches the SVM trained on all negatives at once. Features are
    multiplied by ``feat_scale`` (average norm 20). Classes share each image's features, so a
    streaming source computes them once for all ``classes``.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    cols = np.asarray(classes, np.int64) - 1
    pos: dict[int, list[np.ndarray]] = {k: [] for k in classes}
    for i in range(source.num_images):
        rows = source.rows(i)
        gt_rows = np.flatnonzero(np.isin(rows.gt_classes, classes))
        if gt_rows.size:
            x = source.fc7(i, gt_rows) * feat_scale
            for k in classes:
                pos[k].append(x[rows.gt_classes[gt_rows] == k])
    dim = source.fc7_dim
    caches = {k: _MiningCache(np.concatenate(pos[k]) if pos[k] else np.zeros((0, dim), np.float32), dim)
              for k in classes}
    mining = [k for k in classes if len(caches[k].x_pos)]
    for k in sorted(set(classes) - set(mining)):
        warnings.warn(f"R-CNN SVM: class {k} has no ground-truth boxes in the training set; it will never fire")
    fit = dict(C=C, pos_weight=pos_weight, intercept_scaling=intercept_scaling, evict_thresh=evict_thresh)

    total = passes * source.num_images
    bar = tqdm(total=total, desc=f"svm {classes if len(classes) < 4 else len(classes)}", unit="img",
               disable=not progress or not mining, dynamic_ncols=True)
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
                sel = is_neg[need, c]
                hard = sel & (cache.scores(x) > hard_thresh)
                cache.add(x[hard], i * (1 << 32) + need[hard].astype(np.int64), dedupe=p > 0)
                if (not cache.trained and cache.num_added) or cache.num_added > retrain_limit:
                    cache.retrain(**fit)
                cache.seconds += time.perf_counter() - t0
    bar.close()
    out = {}
    for k in classes:
        cache = caches[k]
        if k in mining and (cache.num_added or not cache.trained):
            t0 = time.perf_counter()
            if cache.num_added or len(cache.x_neg):
                cache.retrain(**fit)
            cache.seconds += time.perf_counter() - t0
        weight, bias = cache.weight, cache.bias
        if not cache.trained:  # no positives, or no negatives at all: a detector that never fires
            if k in mining:
                warnings.warn(f"R-CNN SVM: class {k} has no negatives to train against; it will never fire")
            weight, bias = np.zeros(dim, np.float32), -10.0
        out[k] = ClassSVM(weight, bias, {
            "num_pos": len(cache.x_pos), "num_neg_cached": len(cache.x_neg), "hard_negatives_added": cache.hard_added,
            "retrains": cache.retrains, "objective": cache.objective, "train_seconds": round(cache.seconds, 3),
            "wall_seconds": round(time.perf_counter() - t_start, 3)})
    return out


def _class_files(svm_dir: Path, k: int) -> tuple[Path, Path]:
    return svm_dir / f"class_{k:03d}.npz", svm_dir / f"class_{k:03d}.json"


def _load_class(svm_dir: Path, k: int, settings: dict) -> ClassSVM | None:
    npz, meta = _class_files(svm_dir, k)
    if not (npz.is_file() and meta.is_file()):
        return None
    info = read_json(meta)
    if info.get("settings") != settings:
        return None
    with np.load(npz, allow_pickle=False) as z:
        return ClassSVM(z["weight"], float(z["bias"]), info["stats"])


def _save_class(svm_dir: Path, k: int, svm: ClassSVM, settings: dict) -> None:
    npz, meta = _class_files(svm_dir, k)
    with atomic_path(npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, weight=svm.weight, bias=np.float32(svm.bias))
    write_json_atomic(meta, {"class": k, "settings": settings, "stats": svm.stats})


def _svm_worker(cache_dir: str, svm_dir: str, k: int, settings: dict) -> int:
    """One class in a worker process: read the memory-mapped cache, mine, save the class."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        svm = mine_svms(FeatureCache(cache_dir), [k], **settings)[k]
    _save_class(Path(svm_dir), k, svm, settings)
    return k


def train_svms(source: FeatureSource, svm_dir: str | os.PathLike, *, num_classes: int, workers: int = 0,
               progress: bool = True, **settings) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train (or resume) the K class SVMs; returns weight [K, D], bias [K] and per-class stats.

    Each finished class is saved as ``class_KKK.npz`` + ``.json`` (settings, time, counts) and
    skipped by a resumed run. With a ``FeatureCache`` the classes train in ``workers`` processes
    (0 = all cores), each reading the cache itself; a streaming source trains all classes in
    this process, sharing each image's features. ``settings`` are ``mine_svms``' keywords.
    """
    from tqdm import tqdm

    svm_dir = Path(svm_dir)
    svm_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in settings.items()}
    results = {k: r for k in range(1, num_classes + 1) if (r := _load_class(svm_dir, k, settings)) is not None}
    todo = [k for k in range(1, num_classes + 1) if k not in results]
    workers = min(workers or os.cpu_count() or 1, len(todo))
    if todo and isinstance(source, FeatureCache) and workers > 1:
        import multiprocessing

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


# ----------------------------------------------------------------------------------------------
# Box regression ([RCNN] appendix C, bbox_regression/rcnn_train_bbox_regressor.m)
# ----------------------------------------------------------------------------------------------


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unpenalised intercept: x [N, D], y [N, T] -> w [D, T], b [T].

    Minimises ``||x w + b - y||^2 + lam ||w||^2`` in closed form (float64), through the D x D
    normal equations when N >= D and through the N x N dual ``w = xc^T (xc xc^T + lam I)^-1 yc``
    otherwise (pool5 of VGG16 is 25088-d). Same minimiser as sklearn's Ridge(alpha=lam).
    """
    from scipy.linalg import solve

    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    n, d = xc.shape
    if n >= d:
        w = solve(xc.T @ xc + lam * np.eye(d), xc.T @ yc, assume_a="pos")
    else:
        w = xc.T @ solve(xc @ xc.T + lam * np.eye(n), yc, assume_a="pos")
    return w, y_mean - x_mean @ w


@dataclass
class BoxRegressors:
    weight: np.ndarray  # [K, D5, 4] float32, applied to raw pool5 (the feature scale folded in)
    bias: np.ndarray  # [K, 4]
    target_mean: np.ndarray  # [K, 4]: deltas = (pool5 @ weight + bias) * target_std + target_mean
    target_std: np.ndarray  # [K, 4]
    stats: dict


def train_box_regressors(source: FeatureSource, *, num_classes: int, feat_scale: float, lam: float = 1000.0,
                         min_iou: float = 0.6, progress: bool = True) -> BoxRegressors:
    """Per-class ridge regression from pool5 to (tx, ty, tw, th) ([RCNN] appendix C).

    Examples: rows with IoU >= ``min_iou`` to their best-overlapping gt box, for the class of that
    gt box (gt rows included, target 0). Targets are ``detect.boxes.encode_boxes``, normalised
    per class to zero mean and unit std (the [RCNN] code whitened them with the full 4 x 4
    covariance; per-coordinate is the same idea and what [FRCN] does); features are scaled by
    ``feat_scale`` (average norm 20, as for the SVMs); lambda = 1000.
    """
    import torch
    from tqdm import tqdm

    from detect.boxes import encode_boxes

    per_class: dict[int, list[tuple[int, np.ndarray]]] = {k: [] for k in range(1, num_classes + 1)}
    for i in range(source.num_images):
        rows = source.rows(i)
        use = rows.has_pool5 & (rows.best_iou >= min_iou) & (rows.best_classes > 0)
        for k in np.unique(rows.best_classes[use]).tolist():
            per_class[k].append((i, np.flatnonzero(use & (rows.best_classes == k))))
    weight = np.zeros((num_classes, source.pool5_dim, 4), np.float32)  # [K, D5, 4]
    bias = np.zeros((num_classes, 4), np.float32)
    mean, std = np.zeros((num_classes, 4), np.float32), np.ones((num_classes, 4), np.float32)
    stats = {}
    for k in tqdm(range(1, num_classes + 1), desc="box regression", unit="class", disable=not progress,
                  dynamic_ncols=True):
        t0 = time.perf_counter()
        xs, ts = [], []
        for i, idx in per_class[k]:
            rows = source.rows(i)
            xs.append(source.pool5(i, idx))
            proposal_boxes, gt_boxes = torch.from_numpy(rows.boxes[idx]), torch.from_numpy(rows.best_gt_boxes[idx])
            ts.append(encode_boxes(proposal_boxes, gt_boxes).numpy())  # [n, 4]
        if not xs:
            warnings.warn(f"R-CNN box regression: class {k} has no examples; its boxes stay as proposed")
            stats[str(k)] = {"num_examples": 0, "seconds": 0.0}
            continue
        x = np.concatenate(xs) * feat_scale  # [N, D5]
        t = np.concatenate(ts)  # [N, 4]
        mean[k - 1] = t.mean(axis=0)
        std[k - 1] = np.where(t.std(axis=0) > 1e-6, t.std(axis=0), 1.0)
        w, b = fit_ridge(x, (t - mean[k - 1]) / std[k - 1], lam)
        weight[k - 1], bias[k - 1] = w * feat_scale, b  # scale folded in: the weights take raw pool5
        residual = (x @ w + b) * std[k - 1] + mean[k - 1] - t
        stats[str(k)] = {"num_examples": int(len(x)), "seconds": round(time.perf_counter() - t0, 3),
                         "target_rmse_before": float(np.sqrt((t ** 2).mean())),
                         "target_rmse_after": float(np.sqrt((residual ** 2).mean()))}
    return BoxRegressors(weight, bias, mean, std, stats)
