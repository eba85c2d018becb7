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
from scipy.linalg.blas import dsyrk
from tqdm import tqdm

from detect.common.boxes import encode_boxes
from detect.training.feature_cache import FeatureSource


class RidgeAccumulator:
    """Ridge regression with a penalised bias column, from examples streamed in chunks.

    Minimises ``||x w + b - y||^2 + lam (||w||^2 + b^2)`` ([RCNN] ``rcnn_train_bbox_regressor.m``)
    from float64 chunks of ``chunk_rows`` rows, keeping the D x D Gram matrix's upper triangle
    (BLAS syrk, in place): about ``8 D^2`` bytes whatever the number of examples.
    """

    def __init__(self, dim: int, targets: int, *, chunk_rows: int = 512):
        self.gram = np.zeros((dim, dim), np.float64, order="F")  # [D, D]: x^T x (upper triangle)
        self.col_sum = np.zeros(dim, np.float64)  # [D]: x^T 1
        self.rhs = np.zeros((dim, targets), np.float64)  # [D, T]: x^T y
        self.y_sum = np.zeros(targets, np.float64)  # [T]: 1^T y
        self.dim, self.chunk_rows, self.count = dim, chunk_rows, 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """x [n, D] and y [n, T], any float dtype."""
        for s in range(0, len(x), self.chunk_rows):
            xs = np.asfortranarray(x[s:s + self.chunk_rows], np.float64)  # [c, D]
            ys = np.asarray(y[s:s + self.chunk_rows], np.float64)  # [c, T]
            self.gram = dsyrk(1.0, xs, beta=1.0, c=self.gram, trans=1, lower=0, overwrite_c=1)
            self.col_sum += xs.sum(axis=0)
            self.rhs += xs.T @ ys
            self.y_sum += ys.sum(axis=0)
            self.count += len(xs)

    def solve(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """-> w [D, T], b [T], consuming the accumulator (the Gram matrix is factorised in place):
        [[G + lam I, s], [s^T, n + lam]] [w; b] = [r; r0] with s = x^T 1 gives b =
        (r0 - s^T w) / (n + lam), and (G + lam I - s s^T / (n + lam)) w = r - s r0 / (n + lam)."""
        gram, self.gram = self.gram, None
        corner = self.count + lam
        for s in range(0, self.dim, self.chunk_rows):  # rank-1 update, in blocks of columns
            block = slice(s, s + self.chunk_rows)
            gram[:, block] -= np.outer(self.col_sum, self.col_sum[block] / corner)
        gram[np.diag_indices_from(gram)] += lam
        factor = cho_factor(gram, lower=False, overwrite_a=True, check_finite=False)  # upper triangle only
        w = cho_solve(factor, self.rhs - np.outer(self.col_sum, self.y_sum / corner), check_finite=False)
        return w, (self.y_sum - self.col_sum @ w) / corner


def fit_ridge_dual(x: np.ndarray, y: np.ndarray, lam: float, *, chunk_rows: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``RidgeAccumulator``'s minimiser through the N x N dual, ``beta = A^T (A A^T + lam I)^-1 y``
    with A = [x 1]: x stays as given (float32), the system is float64 from ``chunk_rows`` blocks."""
    n = len(x)
    kernel = np.ones((n, n), np.float64)  # [N, N]: A A^T = x x^T + 1 1^T
    for s in range(0, n, chunk_rows):
        xs = np.asarray(x[s:s + chunk_rows], np.float64)
        for t in range(0, s + 1, chunk_rows):
            block = xs @ np.asarray(x[t:t + chunk_rows], np.float64).T
            kernel[s:s + chunk_rows, t:t + chunk_rows] += block
            if t != s:
                kernel[t:t + chunk_rows, s:s + chunk_rows] += block.T
    kernel[np.diag_indices_from(kernel)] += lam
    alpha = cho_solve(cho_factor(kernel, overwrite_a=True, check_finite=False),
                      np.asarray(y, np.float64), check_finite=False)  # [N, T]
    w = np.zeros((x.shape[1], alpha.shape[1]), np.float64)
    for s in range(0, n, chunk_rows):
        w += np.asarray(x[s:s + chunk_rows], np.float64).T @ alpha[s:s + chunk_rows]
    return w, alpha.sum(axis=0)


def dual_is_smaller(n: int, d: int) -> bool:
    """True when the dual (float32 x, N x N float64) needs less memory than the D x D primal."""
    return n * d * 4 + n * n * 8 < d * d * 8


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

    Examples: rows with IoU > ``min_iou`` to their best gt box, for its class; targets
    (``detect.common.boxes.encode_boxes``) normalised per class; features scaled by ``feat_scale``.
    Solved by ``RidgeAccumulator`` or ``fit_ridge_dual``, whichever needs less memory.
    """
    # class -> (image, its example rows, their targets [n, 4]) per image with examples of the class
    per_class: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {k: [] for k in range(1, num_classes + 1)}
    for i in range(source.num_images):
        rows = source.rows(i)
        use = rows.has_pool5 & (rows.best_iou > min_iou) & (rows.best_classes > 0)
        for k in np.unique(rows.best_classes[use]).tolist():
            idx = np.flatnonzero(use & (rows.best_classes == k))
            targets = encode_boxes(torch.from_numpy(rows.boxes[idx]), torch.from_numpy(rows.best_gt_boxes[idx]))
            per_class[k].append((i, idx, targets.numpy()))
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
        t = np.concatenate([targets for _, _, targets in per_class[k]])  # [N, 4]
        mean[k - 1] = t.mean(axis=0)
        std[k - 1] = np.where(t.std(axis=0) > 1e-6, t.std(axis=0), 1.0)
        if dual_is_smaller(len(t), source.pool5_dim):
            x = np.concatenate([source.pool5(i, idx) for i, idx, _ in per_class[k]]) * np.float32(feat_scale)
            w, b = fit_ridge_dual(x, (t - mean[k - 1]) / std[k - 1], lam)
            del x
        else:
            acc = RidgeAccumulator(source.pool5_dim, 4)
            for i, idx, targets in per_class[k]:
                acc.add(source.pool5(i, idx) * np.float32(feat_scale), (targets - mean[k - 1]) / std[k - 1])
            w, b = acc.solve(lam)
        weight[k - 1], bias[k - 1] = w * feat_scale, b  # scale folded in: the weights take raw pool5
        sq_err = 0.0
        for i, idx, targets in per_class[k]:  # a third pass for the fit's residual (a report figure only)
            pred = (source.pool5(i, idx) @ weight[k - 1] + bias[k - 1]) * std[k - 1] + mean[k - 1]
            sq_err += float(((pred - targets) ** 2).sum())
        stats[str(k)] = {"num_examples": int(len(t)), "seconds": round(time.perf_counter() - t0, 3),
                         "target_rmse_before": float(np.sqrt((t ** 2).mean())),
                         "target_rmse_after": float(np.sqrt(sq_err / t.size))}
    return BoxRegressors(weight, bias, mean, std, stats)
