"""R-CNN's feature cache: per-image rows (regions) and their fc7 / pool5 features on disk.

numpy only, for the SVM worker processes; ``detect.training.rcnn_train`` computes the features.
Shapes: R rows of one image (``ImageRows``); K, D (the SVMs' fc7) and D5 (box regression's
flattened pool5) as in ``detect.models.rcnn``.

Feature cache (one folder, written by ``detect.training.rcnn_train.extract_features``)::

    meta.json                 {"format": "detect-rcnn-features", "version", "num_images",
                               "images_per_shard", "num_shards", "fc7_dim", "pool5_dim",
                               "num_classes", "bbox_min_iou", "image_ids"}
    shard_00000/              images [0, images_per_shard) of the dataset, in dataset order
        fc7.f16               raw little-endian float16 [rows, D], every row of every image
        pool5.f16             raw float16 [P, D5], only rows with best IoU > bbox_min_iou
        index.npy             int64 [images, 3]: (image_id, first row, number of rows)
        rows.npz              per-row arrays of ImageRows (below) + pool5_index [rows] int32
                              (row of pool5.f16, -1 when the row has no pool5)
        meta.json             counts and dims of this shard, and "pool5_norm_sum" /
                              "pool5_norm_count": L2 norms of pool5 over this shard's part of
                              the random row sample of ``norm_sample_images`` (any IoU)
    done                      written last

A shard folder is built under a temporary name and renamed into place, so a shard either exists
whole or not at all; a resumed run skips existing shards. Ranks write disjoint shards.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from detect.common.fileio import read_json, write_json_atomic

FEATURE_FORMAT = "detect-rcnn-features"
FEATURE_VERSION = 2  # 2: shards carry the pool5 norm sample
_ROW_FIELDS = ("boxes", "gt_classes", "overlaps", "best_iou", "best_classes", "best_gt_boxes", "has_pool5")


@dataclass
class ImageRows:
    """What R-CNN's later stages need to know about each row (region) of one image."""

    image_id: int
    boxes: np.ndarray  # [R, 4] float32 xyxy: the image's trained-on gt boxes (datasets.training_gt), then proposals
    gt_classes: np.ndarray  # [R] int16: class 1..K of a ground-truth row, 0 for a proposal
    overlaps: np.ndarray  # [R, K] float32: IoU with the closest gt box of each class (any gt)
    best_iou: np.ndarray  # [R] float32: IoU with the best-overlapping trained-on gt box
    best_classes: np.ndarray  # [R] int16: that gt box's class (0 when the image has none)
    best_gt_boxes: np.ndarray  # [R, 4] float32: that gt box (zeros when none)
    has_pool5: np.ndarray  # [R] bool: best_iou > bbox_min_iou, i.e. used by box regression

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


class FeatureSource(Protocol):
    """Per-image rows and their features: ``FeatureCache``, or ``detect.training.rcnn_train.StreamingFeatures``."""

    num_images: int
    fc7_dim: int  # D
    pool5_dim: int  # D5

    def rows(self, i: int) -> ImageRows: ...

    def fc7(self, i: int, rows: np.ndarray) -> np.ndarray: ...  # [len(rows), D] float32

    def pool5(self, i: int, rows: np.ndarray) -> np.ndarray: ...  # [len(rows), D5] float32


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
        self._norm_sum, self._norm_count = 0.0, 0

    def add(self, rows: ImageRows, fc7: np.ndarray, pool5: np.ndarray, pool5_norms: np.ndarray | None = None) -> None:
        """``fc7`` [R, D] of every row, ``pool5`` [P, D5] of the ``has_pool5`` rows, ``pool5_norms``
        the pool5 L2 norms of the image's rows in the norm sample (if any)."""
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
        if pool5_norms is not None:
            self._norm_sum += float(np.sum(np.asarray(pool5_norms, np.float64)))
            self._norm_count += int(np.size(pool5_norms))

    def close(self) -> None:
        for f in (self._fc7, self._pool5):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        np.save(self.tmp / "index.npy", np.asarray(self._index, np.int64).reshape(-1, 3))
        np.savez(self.tmp / "rows.npz", **{k: np.concatenate(v) if v else np.zeros(0) for k, v in self._rows.items()})
        write_json_atomic(self.tmp / "meta.json", {
            "num_images": len(self._index), "num_rows": self._num_rows, "num_pool5": self._num_pool5,
            "fc7_dim": self.fc7_dim, "pool5_dim": self.pool5_dim,
            "pool5_norm_sum": self._norm_sum, "pool5_norm_count": self._norm_count})
        os.replace(self.tmp, self.final)


class FeatureCache:
    """A ``FeatureSource`` reading the cache folder of the module docstring; image ``i`` is the
    dataset's i-th. Features are float32 copies of the memory-mapped rows asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = meta = read_json(self.path / "meta.json")
        if meta.get("format") != FEATURE_FORMAT:
            raise ValueError(f"{self.path / 'meta.json'}: not an R-CNN feature cache (format {meta.get('format')!r})")
        self.num_images = int(meta["num_images"])
        self.images_per_shard = int(meta["images_per_shard"])
        self.fc7_dim, self.pool5_dim = int(meta["fc7_dim"]), int(meta["pool5_dim"])
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
        return ImageRows(image_id=int(shard["index"][i % self.images_per_shard, 0]),
                         **{k: shard[k][start:start + count] for k in _ROW_FIELDS})

    def fc7(self, i: int, rows: np.ndarray) -> np.ndarray:
        shard, start, _ = self._locate(i)
        return np.asarray(shard["fc7"][start + np.asarray(rows, np.int64)], np.float32)

    def pool5(self, i: int, rows: np.ndarray) -> np.ndarray:
        shard, start, _ = self._locate(i)
        where = shard["pool5_index"][start + np.asarray(rows, np.int64)]
        if (where < 0).any():
            raise ValueError(f"{self.path}: image {i}: pool5 was cached only for rows with IoU > "
                             f"{self.meta['bbox_min_iou']}")
        return np.asarray(shard["pool5"][where], np.float32)

    @property
    def pool5_norm(self) -> float:
        """Mean pool5 L2 norm over the random row sample measured during extraction (any IoU)."""
        shards = [read_json(self.path / shard_name(k) / "meta.json") for k in range(int(self.meta["num_shards"]))]
        return _checked_mean(sum(float(m["pool5_norm_sum"]) for m in shards),
                             sum(int(m["pool5_norm_count"]) for m in shards), "pool5")


def feature_cache_bytes(cache_dir: str | Path) -> dict:
    """Bytes on disk of a feature cache, in total and per image (fc7, pool5, row metadata)."""
    parts = {"fc7": 0, "pool5": 0, "rows": 0}
    for f in Path(cache_dir).glob("shard_*/*"):
        parts["fc7" if f.name == "fc7.f16" else "pool5" if f.name == "pool5.f16" else "rows"] += f.stat().st_size
    total = sum(parts.values())
    n = max(FeatureCache(cache_dir).num_images, 1)
    return {"total": total, "per_image": total / n, **{f"{k}_per_image": v / n for k, v in parts.items()}}


# The feature-norm sample ([RCNN] rcnn_feature_stats.m): this many random images, this many random
# rows of each, drawn with this seed.
NORM_SAMPLE_IMAGES = 200
NORM_SAMPLE_ROWS = 200
NORM_SAMPLE_SEED = 0


def norm_sample_images(num_images: int) -> set[int]:
    """The images whose rows the feature norm is measured on: ``NORM_SAMPLE_IMAGES`` seeded random ones."""
    rng = np.random.default_rng(NORM_SAMPLE_SEED)
    return set(rng.permutation(num_images)[:NORM_SAMPLE_IMAGES].tolist())


def norm_sample_rows(i: int, num_rows: int) -> np.ndarray:
    """Sorted row indices of image ``i`` in the norm sample: ``NORM_SAMPLE_ROWS`` random rows of
    any IoU, seeded by (``NORM_SAMPLE_SEED``, i) so every rank and a resumed run draw the same rows."""
    rng = np.random.default_rng([NORM_SAMPLE_SEED, i])
    return np.sort(rng.permutation(num_rows)[:NORM_SAMPLE_ROWS])


def _checked_mean(total: float, count: int, layer: str) -> float:
    if count == 0:
        raise ValueError(f"no {layer} features to measure (no proposals or ground truth in the training set?)")
    mean = total / count
    if not mean > 0:
        raise ValueError(f"{layer} features are all zero: the network gives no signal")
    return mean


def mean_feature_norm(source: FeatureSource, layer: str) -> float:
    """Mean L2 norm of ``layer`` ("fc7" or "pool5") features over the norm sample's rows
    ([RCNN] ``rcnn_feature_stats.m``); a ``FeatureCache``'s pool5 norm was measured on this
    sample at extraction (``FeatureCache.pool5_norm``)."""
    if layer == "pool5" and isinstance(source, FeatureCache):
        return source.pool5_norm
    total, count = 0.0, 0
    for i in sorted(norm_sample_images(source.num_images)):
        pick = norm_sample_rows(i, len(source.rows(i)))  # an image without rows adds an empty sum
        feats = source.fc7(i, pick) if layer == "fc7" else source.pool5(i, pick)
        norms = np.linalg.norm(feats.astype(np.float64), axis=1)
        total, count = total + float(norms.sum()), count + norms.size
    return _checked_mean(total, count, layer)
