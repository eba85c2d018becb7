"""R-CNN: region warping, hard-negative mining, box ridge regression, the four resumable stages."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.svm import LinearSVC

from detect.commands import train_from_config
from detect.models import rcnn
from detect.models.build import build_from_checkpoint
from detect.training.rcnn_train import FineTuneSampler
from detect.common.config import from_dict
from detect.data.datasets import load_coco
from detect.data.images import read_image
from detect.common.checkpoints import load_checkpoint
from detect.training.box_regression import RidgeAccumulator, fit_ridge_dual, train_box_regressors
from detect.training.feature_cache import FeatureCache, ImageRows, mean_feature_norm, norm_sample_rows
from detect.training.rcnn_svm import mine_svms
from detect.common.boxes import encode_boxes



pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# Warping against slow references
# ----------------------------------------------------------------------------------------------


def _bilinear_reference(image: np.ndarray, box, crop: int, pad: int, fill: np.ndarray) -> np.ndarray:
    """float64, one box: dilate as [RCNN], sample each output pixel centre bilinearly from the
    image extended by the constant ``fill`` (the definition warp_regions implements)."""
    height, width, _ = image.shape
    scale = crop / (crop - 2 * pad)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) / 2 * scale, (box[3] - box[1]) / 2 * scale
    j = np.arange(crop) + 0.5
    xs = cx - hw + j * 2 * hw / crop - 0.5  # pixel-centre coordinates
    ys = cy - hh + j * 2 * hh / crop - 0.5
    x, y = np.meshgrid(xs, ys)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    ax, ay = (x - x0)[..., None], (y - y0)[..., None]

    def pixel(yy, xx):
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        out = np.broadcast_to(fill, yy.shape + (3,)).copy()
        out[inside] = image[yy[inside], xx[inside]]
        return out

    return ((1 - ay) * (1 - ax) * pixel(y0, x0) + (1 - ay) * ax * pixel(y0, x0 + 1)
            + ay * (1 - ax) * pixel(y0 + 1, x0) + ay * ax * pixel(y0 + 1, x0 + 1))


def test_warp_matches_bilinear_reference_inside_across_and_outside_the_border():
    rng = np.random.default_rng(0)
    image = rng.random((37, 53, 3))  # noise: the worst case for interpolation differences
    fill = np.array([0.3, 0.5, 0.7])
    boxes = [[x, y, x + rng.uniform(0.5, 60), y + rng.uniform(0.5, 60)]
             for x, y in zip(rng.uniform(-20, 53, 60), rng.uniform(-20, 37, 60))]
    boxes += [[-100, -100, -50, -50], [0, 0, 53, 37], [10.25, 3.5, 10.75, 30]]  # outside, whole, thin
    crop, pad = 24, 4
    out = rcnn.warp_regions(torch.tensor(image, dtype=torch.float32).permute(2, 0, 1),
                            torch.tensor(boxes, dtype=torch.float32), crop_size=crop, context_pad=pad,
                            fill=torch.tensor(fill, dtype=torch.float32))
    assert out.shape == (len(boxes), 3, crop, crop)
    for box, crop_t in zip(boxes, out):
        ref = _bilinear_reference(image, box, crop, pad, fill)
        np.testing.assert_allclose(crop_t.permute(1, 2, 0).numpy(), ref, atol=1e-4)  # float32 vs float64
    np.testing.assert_allclose(out[len(boxes) - 3].numpy(), np.broadcast_to(fill[:, None, None], (3, crop, crop)),
                               atol=1e-6)  # a box outside the image is all mean


def test_warp_matches_mean_padded_cv2_crop_and_resize():
    """[RCNN]-style reference: pad the image with the mean, crop the dilated box, cv2.resize.

    Dilated boxes are whole pixels and at least crop-size wide (cv2.resize then samples exactly
    the points roi_align samples; upsampling would make cv2 replicate the crop's own edge)."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (60, 80, 3)).astype(np.float32)
    mean = np.array([100.0, 120.0, 140.0], np.float32)
    crop, pad, margin = 16, 2, 100
    padded = cv2.copyMakeBorder(image, margin, margin, margin, margin, cv2.BORDER_CONSTANT, value=mean.tolist())
    big_boxes = []
    for _ in range(40):
        x1, y1 = rng.integers(-30, 70), rng.integers(-30, 50)
        big_boxes.append([x1, y1, x1 + rng.integers(crop, 70), y1 + rng.integers(crop, 70)])
    big = np.array(big_boxes, np.float64)
    scale = crop / (crop - 2 * pad)  # undo the dilation warp_regions will apply
    center, half = (big[:, :2] + big[:, 2:]) / 2, (big[:, 2:] - big[:, :2]) / 2 / scale
    boxes = np.concatenate([center - half, center + half], axis=1)
    out = rcnn.warp_regions(torch.from_numpy(image).permute(2, 0, 1), torch.tensor(boxes, dtype=torch.float32),
                            crop_size=crop, context_pad=pad, fill=torch.from_numpy(mean))
    for (x1, y1, x2, y2), crop_t in zip(big.astype(int), out):
        patch = padded[y1 + margin:y2 + margin, x1 + margin:x2 + margin]
        ref = cv2.resize(patch, (crop, crop), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(crop_t.permute(1, 2, 0).numpy(), ref, atol=2e-3)  # of 255: float32 rounding


def test_warp_no_boxes_and_bad_padding():
    image = torch.zeros(3, 10, 10)
    assert rcnn.warp_regions(image, torch.zeros(0, 4), crop_size=8, context_pad=2).shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="context_pad"):
        rcnn.warp_regions(image, torch.tensor([[0.0, 0, 5, 5]]), crop_size=8, context_pad=4)


# ----------------------------------------------------------------------------------------------
# SVMs and box regression on toy feature sources
# ----------------------------------------------------------------------------------------------


class ToySource:
    """A FeatureSource held in memory: image i has rows with given features and overlaps."""

    def __init__(self, images: list[tuple[ImageRows, np.ndarray, np.ndarray]]):
        self.images = images
        self.num_images = len(images)
        self.fc7_dim = images[0][1].shape[1]
        self.pool5_dim = images[0][2].shape[1]

    def rows(self, i):
        return self.images[i][0]

    def fc7(self, i, rows):
        return self.images[i][1][rows]

    def pool5(self, i, rows):
        return self.images[i][2][rows]


def _rows(image_id, gt_classes, overlaps, boxes=None, best_gt=None, pool5_iou=None) -> ImageRows:
    n = len(gt_classes)
    boxes = np.zeros((n, 4), np.float32) if boxes is None else boxes
    best_iou = overlaps.max(axis=1) if pool5_iou is None else pool5_iou
    return ImageRows(image_id=image_id, boxes=boxes, gt_classes=np.asarray(gt_classes, np.int16),
                     overlaps=overlaps.astype(np.float32), best_iou=best_iou.astype(np.float32),
                     best_classes=(overlaps.argmax(axis=1) + 1).astype(np.int16),
                     best_gt_boxes=boxes if best_gt is None else best_gt, has_pool5=best_iou > 0.6)


def test_hard_negative_mining_matches_an_svm_trained_on_all_negatives():
    rng = np.random.default_rng(0)
    dim, images = 20, []
    direction = rng.normal(size=dim)
    for i in range(40):
        num_pos, num_neg, num_ignored = 2, 150, 5
        pos = rng.normal(size=(num_pos, dim)) + 1.2 * direction  # the gt rows of class 1
        neg = rng.normal(size=(num_neg, dim))
        ignored = rng.normal(size=(num_ignored, dim)) + 2.0 * direction  # IoU in [0.3, 1): neither
        feats = np.concatenate([pos, neg, ignored]).astype(np.float32)
        overlaps = np.concatenate([np.ones(num_pos), rng.uniform(0, 0.29, num_neg), rng.uniform(0.3, 0.9, num_ignored)])
        gt = [1] * num_pos + [0] * (num_neg + num_ignored)
        images.append((_rows(i, gt, overlaps[:, None]), feats, np.zeros((len(gt), 1), np.float32)))
    source = ToySource(images)
    scale = 20.0 / np.mean([np.linalg.norm(f, axis=1).mean() for _, f, _ in images])
    mined = mine_svms(source, [1], feat_scale=scale, retrain_limit=300, passes=2)[1]

    x_pos = np.concatenate([f[r.gt_classes == 1] for r, f, _ in images]) * scale
    x_neg = np.concatenate([f[r.overlaps[:, 0] < 0.3] for r, f, _ in images]) * scale
    full = LinearSVC(C=0.001, loss="hinge", dual=True, class_weight={1: 2.0, -1: 1.0}, intercept_scaling=10.0,
                     tol=1e-6, max_iter=100000, random_state=0)
    full.fit(np.concatenate([x_pos, x_neg]), np.r_[np.ones(len(x_pos)), -np.ones(len(x_neg))])

    # Mining really pruned the problem, yet the solution is the full one (solver tolerance).
    assert mined.stats["retrains"] >= 3 and mined.stats["num_neg_cached"] < 0.5 * len(x_neg)
    grid = np.concatenate([x_pos, x_neg, rng.normal(size=(500, dim)) * scale * 2])
    diff = np.abs(grid @ mined.weight + mined.bias - full.decision_function(grid))
    assert diff.max() < 0.05, diff.max()  # decision values span about [-4, 3]
    np.testing.assert_allclose(mined.weight, full.coef_[0], atol=0.01)


def test_svm_of_a_class_without_positives_never_fires():
    rows = _rows(0, [0, 0], np.zeros((2, 2)))
    source = ToySource([(rows, np.ones((2, 3), np.float32), np.zeros((2, 1), np.float32))])
    with pytest.warns(UserWarning, match="class 2 has no ground-truth"):
        svm = mine_svms(source, [2], feat_scale=1.0)[2]
    assert not svm.weight.any() and svm.bias < -5


@pytest.mark.parametrize("n", [200, 12])  # more and fewer examples than dimensions
def test_ridge_penalises_the_bias_as_rcnn(n):
    """[RCNN] rcnn_train_bbox_regressor.m: X gets a column of ones, then (A'A + lam I) x = A'y;
    the primal (streamed in chunks) and the dual both solve it, whatever N."""
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 30)) + 3.0, rng.normal(size=(n, 4))
    a = np.concatenate([x, np.ones((n, 1))], axis=1)
    beta = np.linalg.solve(a.T @ a + 7.0 * np.eye(31), a.T @ y)  # the reference, float64
    acc = RidgeAccumulator(30, 4, chunk_rows=7)
    acc.add(x[: n // 2], y[: n // 2])
    acc.add(x[n // 2:], y[n // 2:])
    for w, b in (acc.solve(7.0), fit_ridge_dual(x, y, 7.0, chunk_rows=5)):
        np.testing.assert_allclose(w, beta[:-1], atol=1e-8)
        np.testing.assert_allclose(b, beta[-1], atol=1e-8)
    sk = Ridge(alpha=7.0, fit_intercept=True).fit(x, y)  # the unpenalised intercept differs
    assert np.abs(b - sk.intercept_).max() > 1e-3


def test_box_regression_examples_need_iou_strictly_above_the_threshold():
    from detect.data.datasets import ImageRecord
    from detect.training.rcnn_train import image_rows

    record = ImageRecord(1, "x.png", 20, 20, gt_boxes=np.array([[0, 0, 10, 10]], np.float32),
                         gt_classes=np.array([1]), gt_difficult=np.array([False]))
    rows = image_rows(record, np.array([[0, 0, 5, 10], [0, 0, 8, 10]], np.float32), num_classes=1,
                      bbox_min_iou=0.5)
    np.testing.assert_allclose(rows.best_iou, [1.0, 0.5, 0.8])
    assert rows.has_pool5.tolist() == [True, False, True]  # IoU exactly 0.5 is out ([RCNN] O > min_overlap)


def test_box_regressor_learns_a_known_shift():
    """pool5 features that encode each proposal's offset to its gt box -> the regressor recovers it."""
    rng = np.random.default_rng(0)
    images, all_targets, all_feats = [], [], []
    for i in range(60):
        gt = np.array([[50.0, 40.0, 150.0, 120.0]], np.float32)
        jitter = rng.uniform(-0.1, 0.1, (12, 4)) * [100, 80, 100, 80]
        proposals = (gt + jitter).astype(np.float32)
        targets = encode_boxes(torch.from_numpy(proposals), torch.from_numpy(np.repeat(gt, 12, 0))).numpy()
        feats = np.concatenate([targets * 5.0,  # the signal
                                rng.normal(size=(12, 12)) * 0.05], axis=1).astype(np.float32)  # [12, 16]
        rows = _rows(i, [0] * 12, np.full((12, 1), 0.8), boxes=proposals, best_gt=np.repeat(gt, 12, 0))
        images.append((rows, np.zeros((12, 1), np.float32), feats))
        all_targets.append(targets)
        all_feats.append(feats)
    source = ToySource(images)
    reg = train_box_regressors(source, num_classes=1, feat_scale=1.0, lam=1.0, min_iou=0.6, progress=False)
    feats, targets = np.concatenate(all_feats), np.concatenate(all_targets)
    pred = (feats @ reg.weight[0] + reg.bias[0]) * reg.target_std[0] + reg.target_mean[0]  # RCNN's formula
    assert np.abs(pred - targets).max() < 0.01  # targets span about +-0.15
    assert reg.stats["1"]["target_rmse_after"] < 0.1 * reg.stats["1"]["target_rmse_before"]


# ----------------------------------------------------------------------------------------------
# A tiny dataset, trained end to end
# ----------------------------------------------------------------------------------------------


def _tiny_dataset(root: Path, num_images: int = 3, size: int = 96) -> tuple[Path, Path, list[np.ndarray]]:
    """Red boxes (category 3) and blue discs (category 7) on noise; proposals = jittered gt + random."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, annotations, proposals = [], [], []
    for i in range(num_images):
        image = rng.normal(120, 20, (size, size, 3)).clip(0, 255).astype(np.uint8)
        x, y, w, h = *rng.integers(4, 30, 2), *rng.integers(24, 40, 2)
        cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), (220, 40, 40), -1)
        cx, cy, r = *rng.integers(62, 80, 2), int(rng.integers(9, 15))
        cv2.circle(image, (int(cx), int(cy)), r, (40, 40, 220), -1)
        cv2.imwrite(str(root / "images" / f"{i}.png"), image[:, :, ::-1])
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": size, "height": size})
        boxes = []
        for cat, (bx, by, bw, bh) in ((3, (x, y, w, h)), (7, (cx - r, cy - r, 2 * r, 2 * r))):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat, "iscrowd": 0,
                                "bbox": [float(bx), float(by), float(bw), float(bh)], "area": float(bw * bh)})
            gt = np.array([bx, by, bx + bw, by + bh], np.float64)
            boxes += [gt + rng.uniform(-0.12, 0.12, 4) * [bw, bh, bw, bh] for _ in range(5)]
        for _ in range(16):
            x0, y0 = rng.uniform(0, size - 20, 2)
            boxes.append([x0, y0, x0 + rng.uniform(8, 30), y0 + rng.uniform(8, 30)])
        proposals.append(np.array(boxes, np.float32))
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 3, "name": "box"}, {"id": 7, "name": "disc"}]}
    (root / "train.json").write_text(json.dumps(coco))
    return root / "train.json", root / "images", proposals


def _tiny_config(json_path: Path, images: Path, store: Path, **rcnn_overrides):
    return from_dict({
        "detector": "rcnn",
        "data": {"train": {"path": str(json_path), "images": str(images)}, "train_proposals": str(store)},
        "proposals": {"top_k": 0},
        "model": {"backbone": "efficientnet_lite0", "weights": "default", "freeze_at": "block8", "head_dim": 0,
                  "roi_size": 3, "dropout": 0.0},
        "train": {"checkpoint_period": 4, "log_period": 4, "amp": False},
        "rcnn": {"crop_size": 48, "context_pad": 6, "ft_batch_size": 16, "ft_fg_per_batch": 4, "ft_max_iter": 4,
                 "ft_steps": [100], "svm_workers": 2, "svm_retrain_limit": 10, "feature_batch_size": 64,
                 **rcnn_overrides},
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from detect.proposals.store import write_store

    root = tmp_path_factory.mktemp("rcnn")
    json_path, images, proposals = _tiny_dataset(root / "data")
    dataset = load_coco(json_path, images)
    store = write_store(root / "proposals", image_ids=[r.image_id for r in dataset.records],
                        boxes_per_image=proposals, meta={})
    cfg = _tiny_config(json_path, images, store)
    checkpoint = train_from_config(cfg, root / "run", resume=False, progress=False)
    detector = build_from_checkpoint(load_checkpoint(checkpoint))
    return {"root": root, "cfg": cfg, "dataset": dataset, "proposals": proposals, "detector": detector}


def test_tiny_dataset_is_overfit_end_to_end(trained):
    from detect.evaluation.coco import evaluate_detections

    detector = trained["detector"]
    assert detector.kind == "rcnn" and detector.class_names == ["box", "disc"]
    detections = {r.image_id: detector.detect(read_image(r.file_name), p)
                  for r, p in zip(trained["dataset"].records, trained["proposals"])}
    metrics = evaluate_detections(trained["dataset"], detections)
    assert metrics["AP50"] > 0.9, metrics["AP50"]
    stages = json.loads((trained["root"] / "run" / "rcnn_stages.json").read_text())["seconds"]
    assert set(stages) == {"finetune", "features", "svm", "bbox_reg"}


def test_scores_are_chunk_independent_and_empty_proposals_work(trained):
    detector = trained["detector"]
    record, proposals = trained["dataset"].records[0], torch.from_numpy(trained["proposals"][0])
    image = read_image(record.file_name)
    whole = detector.score_proposals(image, proposals)
    detector.test_chunk = 7
    chunked = detector.score_proposals(image, proposals)
    detector.test_chunk = 512
    assert whole.scores.shape == (len(proposals), 2) and whole.deltas.shape == (len(proposals), 2, 4)
    torch.testing.assert_close(whole.scores, chunked.scores, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(whole.deltas, chunked.deltas, atol=1e-5, rtol=1e-4)
    assert ((whole.scores > 0) & (whole.scores < 1)).all()  # squashed margins
    empty = detector.score_proposals(image, torch.zeros(0, 4))
    assert empty.scores.shape == (0, 2) and empty.deltas.shape == (0, 2, 4)
    assert len(detector.detect(image, np.zeros((0, 4), np.float32))) == 0


def test_scores_equal_the_unfolded_networks_and_follow_new_weights(trained):
    """score_proposals runs the folded channels-last inference net: same scores as a slow
    reference pass through ``detector.net`` itself (NCHW, BatchNorm unfolded), on proposals
    partly outside the image; rebuilt after .eval() when the weights change."""
    detector = trained["detector"]
    record = trained["dataset"].records[0]
    image = read_image(record.file_name)
    proposals = torch.cat([torch.from_numpy(trained["proposals"][0]),
                           torch.tensor([[-20.0, -10, 30, 40], [70, 60, 130, 120], [-50, -50, -10, -10]])])

    def reference():
        image_t = rcnn.normalize_image(image, pixel_mean=detector.pixel_mean, pixel_std=detector.pixel_std,
                                       device=torch.device("cpu"))
        crops = rcnn.warp_regions(image_t, proposals, crop_size=detector.crop_size, context_pad=detector.context_pad)
        with torch.no_grad():
            pool5, fc7 = detector.net(crops)
        margin = fc7 * detector.feat_scale @ detector.svm_weight.T + detector.svm_bias
        return torch.sigmoid(margin), pool5.flatten(1)

    fast = detector.score_proposals(image, proposals)
    ref_scores, ref_pool5 = reference()
    torch.testing.assert_close(fast.scores, ref_scores, atol=1e-5, rtol=1e-4)
    fast_pool5, _ = rcnn.region_features(detector.inference_module(), rcnn.normalize_image(
        image, pixel_mean=detector.pixel_mean, pixel_std=detector.pixel_std, device=torch.device("cpu")),
        proposals, crop_size=detector.crop_size, context_pad=detector.context_pad, batch_size=5, amp=False)
    torch.testing.assert_close(fast_pool5, ref_pool5, atol=1e-4, rtol=1e-4)

    state = {k: v.clone() for k, v in detector.state_dict().items()}
    try:
        with torch.no_grad():
            for p in detector.net.head.parameters():
                p.mul_(1.5)
        detector.eval()
        changed = detector.score_proposals(image, proposals)
        torch.testing.assert_close(changed.scores, reference()[0], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(changed.scores, fast.scores)
    finally:
        detector.load_state_dict(state)
        detector.eval()
    assert set(detector.state_dict()) == set(state)  # the inference copy is not a submodule


def test_feature_cache_holds_the_network_features(trained):
    from detect.training.rcnn_svm import mine_svms as mine

    run = trained["root"] / "run"
    cache = FeatureCache(run / "features")
    rows = cache.rows(1)
    assert rows.image_id == trained["dataset"].records[1].image_id
    assert list(rows.gt_classes[:2]) == [1, 2] and len(rows) == 2 + len(trained["proposals"][1])
    np.testing.assert_allclose(rows.boxes[2:], trained["proposals"][1])
    # fc7 of the cache = fc7 of the fine-tuned net on the same warped regions (float16 storage).
    detector = trained["detector"]
    image = rcnn.normalize_image(read_image(trained["dataset"].records[1].file_name),
                                 pixel_mean=detector.pixel_mean, pixel_std=detector.pixel_std,
                                 device=torch.device("cpu"))
    with torch.no_grad():
        pool5, fc7 = rcnn.region_features(detector.net, image, torch.from_numpy(rows.boxes), crop_size=48,
                                          context_pad=6, batch_size=64, amp=False)
    np.testing.assert_allclose(cache.fc7(1, np.arange(len(rows))), fc7.numpy(), rtol=2e-3, atol=2e-3)
    with_pool5 = np.flatnonzero(rows.has_pool5)
    assert with_pool5.size >= 2 and (rows.best_iou[with_pool5] > 0.6).all()
    np.testing.assert_allclose(cache.pool5(1, with_pool5), pool5[with_pool5].numpy(), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="pool5 was cached only"):
        cache.pool5(1, np.flatnonzero(~rows.has_pool5)[:1])
    # The pool5 norm: random rows of any IoU of random images ([RCNN] rcnn_feature_stats.m), not
    # only the cached box-regression rows; here every image is in the sample.
    norms = []
    for i, record in enumerate(trained["dataset"].records):
        image_i = rcnn.normalize_image(read_image(record.file_name), pixel_mean=detector.pixel_mean,
                                       pixel_std=detector.pixel_std, device=torch.device("cpu"))
        pick = norm_sample_rows(i, len(cache.rows(i)))
        with torch.no_grad():
            pool5_i, _ = rcnn.region_features(detector.net, image_i, torch.from_numpy(cache.rows(i).boxes[pick]),
                                              crop_size=48, context_pad=6, batch_size=64, amp=False)
        norms.append(pool5_i.reshape(len(pick), -1).double().norm(dim=1).numpy())
    assert sum(len(n) for n in norms) > sum(int(cache.rows(i).has_pool5.sum()) for i in range(cache.num_images))
    assert cache.pool5_norm == pytest.approx(np.concatenate(norms).mean(), rel=1e-4)
    assert mean_feature_norm(cache, "pool5") == cache.pool5_norm
    # The SVM of a worker process equals the SVM trained here from the same memory-mapped cache.
    settings = json.loads((run / "svm" / "class_002.json").read_text())["settings"]
    here = mine(cache, [2], **settings)[2]
    saved = np.load(run / "svm" / "class_002.npz", allow_pickle=False)
    np.testing.assert_array_equal(here.weight, saved["weight"])


def test_truncated_feature_shard_is_named(trained, tmp_path):
    import shutil

    copy = tmp_path / "features"
    shutil.copytree(trained["root"] / "run" / "features", copy)
    fc7 = copy / "shard_00000" / "fc7.f16"
    fc7.write_bytes(fc7.read_bytes()[:-10])
    with pytest.raises(ValueError, match="fc7.f16: expected"):
        FeatureCache(copy).rows(0)


def test_stages_resume_and_refuse_mismatches(trained):
    run, cfg = trained["root"] / "run", trained["cfg"]
    net_mtime = (run / "finetune" / "net.pt").stat().st_mtime_ns
    fc7 = (run / "features" / "shard_00000" / "fc7.f16").read_bytes()
    bbox_marker = (run / "bbox_reg" / "done").read_text()
    # A killed feature stage: no marker, its shard only half-written under a temporary name.
    (run / "features" / "done").unlink()
    (run / "features" / "shard_00000").rename(run / "features" / ".shard_00000.tmp12345")
    # A half-written SVM stage: the marker and one class are gone; the other class is kept.
    (run / "svm" / "done").unlink()
    (run / "svm" / "class_001.npz").unlink()
    class2 = (run / "svm" / "class_002.npz").stat().st_mtime_ns
    with pytest.raises(ValueError, match="--resume"):
        train_from_config(cfg, run, resume=False, progress=False)
    train_from_config(cfg, run, resume=True, progress=False)
    assert (run / "svm" / "done").is_file() and (run / "svm" / "class_001.npz").is_file()
    assert (run / "svm" / "class_002.npz").stat().st_mtime_ns == class2  # a finished class is kept
    assert (run / "finetune" / "net.pt").stat().st_mtime_ns == net_mtime  # finished stages not redone
    assert (run / "bbox_reg" / "done").read_text() == bbox_marker
    assert (run / "features" / "done").is_file() and not list((run / "features").glob(".shard_*"))
    assert (run / "features" / "shard_00000" / "fc7.f16").read_bytes() == fc7  # redone, identically
    # Other settings for a finished stage: an error that names it, not a silent mix.
    changed = _tiny_config(Path(cfg.data.train.path), Path(cfg.data.train.images), Path(cfg.data.train_proposals),
                           svm_C=0.01)
    with pytest.raises(ValueError, match="svm: holds work done with other settings"):
        train_from_config(changed, run, resume=True, progress=False)


def test_finetune_batches_are_deterministic_and_balanced(trained):
    dataset = trained["dataset"]
    proposals = {r.image_id: p for r, p in zip(dataset.records, trained["proposals"])}
    sampler = FineTuneSampler(records=dataset.records, get_proposals=proposals.__getitem__, num_classes=2,
                                   crop_size=32, context_pad=4, pixel_mean=(0.5,) * 3, pixel_std=(0.25,) * 3,
                                   device=torch.device("cpu"), batch_size=24, fg_per_batch=6, images_per_batch=2,
                                   seed=3)
    crops, labels = sampler.batch(5)
    again, labels_again = sampler.batch(5)
    assert crops.shape == (24, 3, 32, 32) and torch.equal(crops, again) and torch.equal(labels, labels_again)
    assert int((labels > 0).sum()) == 6 and set(labels.tolist()) <= {0, 1, 2}
    assert not torch.equal(sampler.batch(6)[0], crops)


def test_streamed_features_train_the_same_svms_as_cached_ones(trained, tmp_path):
    """cache_features: false recomputes features instead of reading float16 shards."""
    import shutil

    run, cfg = trained["root"] / "run", trained["cfg"]
    shutil.copytree(run / "finetune", tmp_path / "finetune")  # same fine-tuning settings: reused
    streamed_cfg = _tiny_config(Path(cfg.data.train.path), Path(cfg.data.train.images),
                                Path(cfg.data.train_proposals), cache_features=False)
    checkpoint = train_from_config(streamed_cfg, tmp_path, resume=True, progress=False)
    assert not (tmp_path / "features").exists()
    streamed, cached = load_checkpoint(checkpoint)["extra"], load_checkpoint(run / "model_final.pt")["extra"]
    for name in ("svm_weight", "bbox_weight"):
        a, b = streamed[name].flatten().double(), cached[name].flatten().double()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99, name  # float16 storage aside, the same
    assert abs(float(streamed["feat_scale"]) / float(cached["feat_scale"]) - 1) < 1e-3
    streamed_pool5 = np.load(tmp_path / "bbox_reg" / "bbox_reg.npz")["pool5_scale"]
    cached_pool5 = np.load(run / "bbox_reg" / "bbox_reg.npz")["pool5_scale"]
    assert abs(float(streamed_pool5) / float(cached_pool5) - 1) < 1e-4  # the same random rows, any IoU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_scores_match_cpu(trained):
    import copy

    detector = trained["detector"]
    record, proposals = trained["dataset"].records[0], torch.from_numpy(trained["proposals"][0])
    image = read_image(record.file_name)
    cpu = detector.score_proposals(image, proposals)
    gpu = copy.deepcopy(detector).to("cuda").score_proposals(image, proposals)  # bf16/fp16 autocast
    assert gpu.scores.device.type == "cuda"
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, atol=0.05, rtol=0)


def test_image_rows_make_difficult_objects_positives_unless_told_not_to():
    from detect.data.datasets import ImageRecord
    from detect.training.rcnn_train import image_rows

    record = ImageRecord(image_id=7, file_name="x.png", width=100, height=100,
                         gt_boxes=np.array([[0, 0, 20, 20], [50, 50, 90, 90], [0, 50, 30, 90]], np.float32),
                         gt_classes=np.array([1, 2, 2]), gt_difficult=np.array([True, False, True]),
                         gt_crowd=np.array([False, False, True]))
    proposals = np.array([[0, 0, 20, 21]], np.float32)  # IoU 20/21 with the difficult box 0
    rows = image_rows(record, proposals, num_classes=2, bbox_min_iou=0.6)  # rcnn roidb_from_voc.m
    assert rows.gt_classes.tolist() == [1, 2, 0]  # gt rows: difficult box 0 and box 1, not crowd box 2
    assert rows.best_classes[-1] == 1 and rows.best_iou[-1] == pytest.approx(20 / 21)
    rows = image_rows(record, proposals, num_classes=2, bbox_min_iou=0.6, use_difficult=False)
    assert rows.gt_classes.tolist() == [2, 0]
    assert rows.best_classes[-1] == 2 and rows.best_iou[-1] == 0.0  # box 1 is its best trained-on gt
    assert rows.overlaps[-1, 0] == pytest.approx(20 / 21)  # still no negative for class 1
