"""R-CNN's class-specific bounding-box regression ([RCNN] appendix C): ridge regression on pool5.

Reference: ``bbox_regression/rcnn_train_bbox_regressor.m`` in rbgirshick/rcnn.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import solve
from tqdm import tqdm

from detect.common.boxes import encode_boxes
from detect.training.feature_cache import FeatureSource


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unpenalised intercept: x [N, D], y [N, T] -> w [D, T], b [T].

    Minimises ``||x w + b - y||^2 + lam ||w||^2`` in closed form (float64), through the D x D
    normal equations when N >= D and through the N x N dual ``w = xc^T (xc xc^T + lam I)^-1 yc``
    otherwise (pool5 of VGG16 is 25088-d). Same minimiser as sklearn's Ridge(alpha=lam).
    """
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
