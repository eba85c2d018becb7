"""R-CNN's class-specific bounding-box regression ([RCNN] appendix C): ridge regression on pool5.

Reference: ``bbox_regression/rcnn_train_bbox_regressor.m`` in rbgirshick/rcnn.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import cho_factor, cho_solve
from tqdm import tqdm

from detect.common.boxes import encode_boxes
from detect.training.feature_cache import FeatureSource


class RidgeAccumulator:
    """Ridge regression with a penalised bias column, from examples streamed in chunks.

    Minimises ``||x w + b - y||^2 + lam (||w||^2 + ||b||^2)`` as [RCNN]
    ``rcnn_train_bbox_regressor.m`` does (a column of ones appended to X and regularised with
    the weights, solved by Cholesky). Only the (D+1) x (D+1) Gram matrix and the (D+1) x T
    right-hand side are kept, in float64; each chunk of at most ``chunk_rows`` rows is converted
    to float64 for its products (float32 products lose about 1e-4 of the solution here). Peak memory is about ``8 (D+1)^2`` bytes whatever the number of
    examples (5.0 GB for VGG16's 25088-d pool5), and the solve factorises it in place.
    """

    def __init__(self, dim: int, targets: int, *, chunk_rows: int = 512):
        self.gram = np.zeros((dim + 1, dim + 1), np.float64)  # [D+1, D+1]: [x 1]^T [x 1]
        self.rhs = np.zeros((dim + 1, targets), np.float64)  # [D+1, T]: [x 1]^T y
        self.dim, self.chunk_rows, self.count = dim, chunk_rows, 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """x [n, D] and y [n, T], any float dtype."""
        for s in range(0, len(x), self.chunk_rows):
            xs = np.asarray(x[s:s + self.chunk_rows], np.float64)  # [c, D]
            ys = np.asarray(y[s:s + self.chunk_rows], np.float64)  # [c, T]
            d = self.dim
            self.gram[:d, :d] += xs.T @ xs
            col = xs.sum(axis=0)
            self.gram[:d, d] += col
            self.gram[d, :d] += col
            self.gram[d, d] += len(xs)
            self.rhs[:d] += xs.T @ ys
            self.rhs[d] += ys.sum(axis=0)
            self.count += len(xs)

    def solve(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """-> w [D, T], b [T]. Consumes the accumulator (the Gram matrix is factorised in place)."""
        self.gram[np.diag_indices_from(self.gram)] += lam
        # symmetric, so its transpose is the same matrix in Fortran order: cho_factor need not copy
        factor = cho_factor(self.gram.T, lower=False, overwrite_a=True, check_finite=False)
        beta = cho_solve(factor, self.rhs, check_finite=False)  # [D+1, T]
        self.gram = None
        return beta[:-1], beta[-1]


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float, *, chunk_rows: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """x [N, D], y [N, T] -> w [D, T], b [T] minimising ``||x w + b - y||^2 + lam (||w||^2 + b^2)``
    (``RidgeAccumulator`` on arrays already in memory)."""
    acc = RidgeAccumulator(x.shape[1], y.shape[1], chunk_rows=chunk_rows)
    acc.add(x, y)
    return acc.solve(lam)


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

    Examples: rows with IoU > ``min_iou`` (strictly, as ``O > opts.min_overlap`` in [RCNN]
    ``rcnn_train_bbox_regressor.m``) to their best-overlapping gt box, for the class of that gt
    box (gt rows included, target 0). Targets are ``detect.boxes.encode_boxes``, normalised per
    class to zero mean and unit std (the [RCNN] code whitened them with the full 4 x 4
    covariance; per-coordinate is the same idea); features are scaled by ``feat_scale`` (average
    norm 20 over random rows, ``feature_cache.mean_feature_norm``); lambda = 1000 penalises the
    weights and the bias alike (``RidgeAccumulator``). Features stream from ``source`` one image
    at a time in two passes (target statistics, then the Gram matrix): no [N, D5] copy is made.
    """
    per_class: dict[int, list[tuple[int, np.ndarray]]] = {k: [] for k in range(1, num_classes + 1)}
    for i in range(source.num_images):
        rows = source.rows(i)
        use = rows.has_pool5 & (rows.best_iou > min_iou) & (rows.best_classes > 0)
        for k in np.unique(rows.best_classes[use]).tolist():
            per_class[k].append((i, np.flatnonzero(use & (rows.best_classes == k))))
    weight = np.zeros((num_classes, source.pool5_dim, 4), np.float32)  # [K, D5, 4]
    bias = np.zeros((num_classes, 4), np.float32)
    mean, std = np.zeros((num_classes, 4), np.float32), np.ones((num_classes, 4), np.float32)
    stats = {}
    for k in tqdm(range(1, num_classes + 1), desc="box regression", unit="class", disable=not progress,
                  dynamic_ncols=True):
        t0 = time.perf_counter()
        if not per_class[k]:
            warnings.warn(f"R-CNN box regression: class {k} has no examples; its boxes stay as proposed")
            stats[str(k)] = {"num_examples": 0, "seconds": 0.0}
            continue
        targets = {}
        for i, idx in per_class[k]:
            rows = source.rows(i)
            proposal_boxes, gt_boxes = torch.from_numpy(rows.boxes[idx]), torch.from_numpy(rows.best_gt_boxes[idx])
            targets[i] = encode_boxes(proposal_boxes, gt_boxes).numpy()  # [n, 4]
        t = np.concatenate(list(targets.values()))  # [N, 4]
        mean[k - 1] = t.mean(axis=0)
        std[k - 1] = np.where(t.std(axis=0) > 1e-6, t.std(axis=0), 1.0)
        acc = RidgeAccumulator(source.pool5_dim, 4)
        for i, idx in per_class[k]:
            acc.add(source.pool5(i, idx) * feat_scale, (targets[i] - mean[k - 1]) / std[k - 1])
        w, b = acc.solve(lam)
        weight[k - 1], bias[k - 1] = w * feat_scale, b  # scale folded in: the weights take raw pool5
        sq_err = 0.0
        for i, idx in per_class[k]:  # a third pass for the fit's residual (a report figure only)
            pred = (source.pool5(i, idx) @ weight[k - 1] + bias[k - 1]) * std[k - 1] + mean[k - 1]
            sq_err += float(((pred - targets[i]) ** 2).sum())
        stats[str(k)] = {"num_examples": int(len(t)), "seconds": round(time.perf_counter() - t0, 3),
                         "target_rmse_before": float(np.sqrt((t ** 2).mean())),
                         "target_rmse_after": float(np.sqrt(sq_err / t.size))}
    return BoxRegressors(weight, bias, mean, std, stats)
