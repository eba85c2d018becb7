"""Fast R-CNN: RoI sampling, targets, loss, flips, empty inputs, SVD, batches, a tiny overfit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.ops import box_iou, roi_align

from conftest import frcn_config, make_square_dataset
from detect.commands import train_from_config
from detect.models.backbones import Backbone, FcHead
from detect.common.box_ops import flip_boxes
from detect.common.boxes import decode_boxes, encode_boxes
from detect.common.config import Config, from_dict, to_dict
from detect.data.datasets import Dataset, ImageRecord
from detect.models.detector import Detections
from detect.models.build import build_fast_rcnn, build_from_checkpoint
from detect.models.fast_rcnn import FastRCNN, assign_levels, prepare_image
from detect.training.fast_rcnn_train import FastRCNNTrainData, build_optimizer, fast_rcnn_loss, sample_rois

STD = (0.1, 0.1, 0.2, 0.2)
COLOURS = {1: (230, 40, 40), 2: (40, 200, 60)}  # class -> RGB


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_backbone(head_dim: int = 64, roi_size: int = 4) -> Backbone:
    """A small stride-16 conv body and a 2-fc head, random init: fast on CPU."""
    body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
    head = FcHead(fc6=nn.Linear(32 * roi_size * roi_size, head_dim), fc7=nn.Linear(head_dim, head_dim),
                  dropout=0.0)
    return Backbone(body=body, head=head, out_channels=32, stride=16, head_dim=head_dim, roi_size=roi_size,
                    pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.25, 0.25, 0.25), crop_size=224)


def tiny_model(**kwargs) -> FastRCNN:
    torch.manual_seed(0)
    kwargs.setdefault("test_scale", 128)
    kwargs.setdefault("test_max_size", 256)
    return FastRCNN(backbone=tiny_backbone(), class_names=["red", "green"], **kwargs)


def random_boxes(n: int, size: float, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 2 + 4
    return torch.cat([xy, xy + wh], dim=1)  # [n, 4]


def jitter(boxes: torch.Tensor, n: int, amount: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` jittered copies of each box [G, 4] -> [G * n, 4]."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2).repeat_interleave(n, 0)
    noise = (torch.rand(len(wh), 4, generator=generator) * 2 - 1) * amount * wh
    return boxes.repeat_interleave(n, 0) + noise


# ----------------------------------------------------------------------------------------------
# Sampling, targets, loss
# ----------------------------------------------------------------------------------------------


def test_sample_rois_proportions_ranges_and_targets():
    g = torch.Generator().manual_seed(0)
    gt_boxes = torch.tensor([[20.0, 30.0, 120.0, 150.0], [200.0, 40.0, 260.0, 90.0]])
    gt_classes = torch.tensor([2, 1])
    proposals = torch.cat([jitter(gt_boxes, 40, 0.3, g), random_boxes(300, 300, g)])
    rois, labels, targets = sample_rois(proposals, gt_boxes, gt_classes, num_rois=64, bbox_std=STD,
                                        generator=torch.Generator().manual_seed(1))
    fg = labels > 0
    assert len(rois) == 64 and int(fg.sum()) == 16  # [FRCN]: 25% foreground when available
    iou = box_iou(rois, gt_boxes)  # [R, G]
    max_iou, matched = iou.max(dim=1)
    assert (max_iou[fg] >= 0.5).all()
    assert ((max_iou[~fg] >= 0.1) & (max_iou[~fg] < 0.5)).all()
    assert torch.equal(labels[fg], gt_classes[matched[fg]])
    assert (targets[~fg] == 0).all()
    decoded = decode_boxes(targets[fg], rois[fg], tuple(1 / s for s in STD))
    torch.testing.assert_close(decoded, gt_boxes[matched[fg]], rtol=0, atol=1e-3)
    # the same generator seed gives the same sample
    again = sample_rois(proposals, gt_boxes, gt_classes, num_rois=64, bbox_std=STD,
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], rois)


def test_sample_rois_includes_gt_and_handles_empty_images():
    gt_boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0]])
    # no proposals: the gt box itself is the one foreground RoI, with zero targets
    rois, labels, targets = sample_rois(torch.zeros(0, 4), gt_boxes, torch.tensor([1]),
                                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(rois, gt_boxes) and labels.tolist() == [1]
    torch.testing.assert_close(targets, torch.zeros(1, 4))
    # no gt: background only (topped up from IoU < 0.1, which is everything)
    proposals = random_boxes(20, 100, torch.Generator().manual_seed(0))
    rois, labels, targets = sample_rois(proposals, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                                        num_rois=8, generator=torch.Generator().manual_seed(0))
    assert len(rois) == 8 and (labels == 0).all() and (targets == 0).all()
    # nothing at all: zero RoIs with the right shapes
    rois, labels, targets = sample_rois(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                                        generator=torch.Generator().manual_seed(0))
    assert rois.shape == (0, 4) and labels.shape == (0,) and targets.shape == (0, 4)


def test_sample_rois_prefers_the_background_band():
    gt_boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    band = torch.tensor([[0.0, 0.0, 100.0, 30.0]] * 5)  # IoU 0.3
    far = torch.tensor([[200.0, 200.0, 250.0, 250.0]] * 50)  # IoU 0
    rois, labels, _ = sample_rois(torch.cat([band, far]), gt_boxes, torch.tensor([1]), num_rois=8,
                                  generator=torch.Generator().manual_seed(0))
    ious = box_iou(rois, gt_boxes)[:, 0]
    assert labels.tolist() == [1] + [0] * 7
    assert int(((ious > 0.25) & (ious < 0.35)).sum()) == 5  # all band boxes taken, then topped up


def test_encode_decode_round_trip_with_std():
    g = torch.Generator().manual_seed(0)
    proposals, targets = random_boxes(50, 200, g), random_boxes(50, 200, g)
    for weights in [(1.0, 1.0, 1.0, 1.0), tuple(1 / s for s in STD)]:
        deltas = encode_boxes(proposals, targets, weights)
        torch.testing.assert_close(decode_boxes(deltas, proposals, weights), targets, rtol=0, atol=1e-3)
    # normalised targets are the raw ones divided by the std
    torch.testing.assert_close(encode_boxes(proposals, targets, tuple(1 / s for s in STD)),
                               encode_boxes(proposals, targets) / torch.tensor(STD))


def test_loss_without_foreground_and_against_a_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g, requires_grad=True)
    deltas = torch.randn(6, 2, 4, generator=g, requires_grad=True)
    targets = torch.randn(6, 4, generator=g)
    losses = fast_rcnn_loss(logits, deltas, torch.zeros(6, dtype=torch.int64), targets)
    assert losses["loss_box"].item() == 0.0 and torch.isfinite(losses["loss_cls"])
    sum(losses.values()).backward()
    assert logits.grad.abs().sum() > 0 and deltas.grad is not None and (deltas.grad == 0).all()

    labels = torch.tensor([0, 1, 2, 0, 2, 0])
    losses = fast_rcnn_loss(logits, deltas, labels, targets, bbox_loss_weight=2.0)
    ref_cls = -sum(torch.log_softmax(logits[i].double(), 0)[labels[i]] for i in range(6)) / 6
    ref_box = 0.0
    for i in range(6):
        if labels[i] > 0:
            d = (deltas[i, labels[i] - 1] - targets[i]).double().abs()
            ref_box += torch.where(d < 1, 0.5 * d * d, d - 0.5).sum()
    torch.testing.assert_close(losses["loss_cls"].double(), ref_cls)
    torch.testing.assert_close(losses["loss_box"].double(), 2.0 * ref_box / 6)

    empty = fast_rcnn_loss(logits[:0], deltas[:0], labels[:0], targets[:0])
    assert empty["loss_cls"].item() == 0.0 and empty["loss_cls"].requires_grad


# ----------------------------------------------------------------------------------------------
# Images: flips, scaling, empty inputs, batching
# ----------------------------------------------------------------------------------------------


def test_flip_consistency():
    image = np.zeros((40, 60, 3), np.uint8)
    box = np.array([[7.0, 5.0, 19.0, 30.0]], np.float32)  # pixels x 7..18, y 5..29
    image[5:30, 7:19] = 255
    flat = dict(target_size=40, max_size=100, pixel_mean=(0, 0, 0), pixel_std=(1 / 255,) * 3)
    flipped, scales = prepare_image(torch.from_numpy(image), flip=True, **flat)
    assert scales == (1.0, 1.0)
    x1, y1, x2, y2 = flip_boxes(box, 60)[0].astype(int)
    lit = flipped[0] > 0  # [H, W]
    assert lit[y1:y2, x1:x2].all() and int(lit.sum()) == (x2 - x1) * (y2 - y1)
    twice, _ = prepare_image(flipped.permute(1, 2, 0).to(torch.uint8), flip=True, **flat)
    assert torch.equal(twice.to(torch.uint8), torch.from_numpy(image).permute(2, 0, 1))
    np.testing.assert_array_equal(flip_boxes(flip_boxes(box, 60), 60), box)


def test_score_proposals_matches_forward_on_scaled_rois():
    model = tiny_model(test_scale=96, test_max_size=200).eval()
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    proposals = random_boxes(9, 40, torch.Generator().manual_seed(0))
    out = model.score_proposals(image, proposals)
    assert out.scores.shape == (9, 2) and out.deltas.shape == (9, 2, 4)
    x, (sx, sy) = prepare_image(torch.from_numpy(image), target_size=96, max_size=200,
                                pixel_mean=model.pixel_mean, pixel_std=model.pixel_std)
    assert x.shape[1:] == (96, 134)  # shorter side 96, longer 70 * 96 / 50 = 134.4
    rois = torch.cat([torch.zeros(9, 1), proposals * torch.tensor([sx, sy, sx, sy])], dim=1)
    with torch.no_grad():
        logits, deltas = model(x[None], rois)
    torch.testing.assert_close(out.scores, torch.softmax(logits, 1)[:, 1:])
    torch.testing.assert_close(out.deltas, deltas * torch.tensor(STD))  # un-normalised
    torch.testing.assert_close(out.proposal_boxes, proposals)  # original pixels


def test_zero_proposals_give_empty_outputs():
    model = tiny_model().eval()
    image = np.zeros((50, 60, 3), np.uint8)
    out = model.score_proposals(image, torch.zeros(0, 4))
    assert out.scores.shape == (0, 2) and out.deltas.shape == (0, 2, 4) and out.proposal_boxes.shape == (0, 4)
    dets = model.detect(image, np.zeros((0, 4), np.float32))
    assert isinstance(dets, Detections) and len(dets) == 0 and dets.boxes.shape == (0, 4)


def test_batched_forward_equals_per_image():
    model = tiny_model().eval()
    images = torch.randn(2, 3, 64, 80)
    rois = torch.tensor([[0, 5.0, 5.0, 40.0, 50.0], [1, 10.0, 0.0, 70.0, 30.0], [1, 0.0, 0.0, 79.0, 63.0]])
    with torch.no_grad():
        logits, deltas = model(images, rois)
        single = model(images[1:], torch.cat([torch.zeros(2, 1), rois[1:, 1:]], 1))
    torch.testing.assert_close(logits[1:], single[0])
    torch.testing.assert_close(deltas[1:], single[1])


def test_roi_align_option():
    model = tiny_model(roi_op="roi_align").eval()
    out = model.score_proposals(np.zeros((64, 64, 3), np.uint8), torch.tensor([[0.0, 0.0, 30.0, 30.0]]))
    assert out.scores.shape == (1, 2) and torch.isfinite(out.scores).all()
    with pytest.raises(ValueError, match="roi_op"):
        tiny_model(roi_op="roi_max")


# ----------------------------------------------------------------------------------------------
# Truncated SVD
# ----------------------------------------------------------------------------------------------


def test_svd_full_rank_exact_and_high_rank_close():
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a decaying spectrum, as trained fc layers have
        for fc in (model.head.fc6, model.head.fc7):
            u, _, vh = torch.linalg.svd(torch.randn(fc.weight.shape, generator=g), full_matrices=False)
            fc.weight.copy_(u @ torch.diag(0.8 ** torch.arange(len(vh), dtype=torch.float32)) @ vh)
    features = torch.randn(7, 32, 4, 4, generator=g)
    with torch.no_grad():
        reference = model.head(features)
    full = tiny_model().eval()
    full.load_state_dict(model.state_dict())
    full.apply_svd(fc6_rank=10_000, fc7_rank=10_000)  # clamped to min(out, in) = 64
    assert full.head.fc6[0].out_features == 64
    with torch.no_grad():
        torch.testing.assert_close(full.head(features), reference, rtol=1e-5, atol=1e-5)
    model.apply_svd(fc6_rank=32, fc7_rank=32)
    assert model.head.fc6[0].weight.shape == (32, 512) and model.head.fc6[1].weight.shape == (64, 32)
    with torch.no_grad():
        approx = model.head(features)
    assert (approx - reference).norm() / reference.norm() < 1e-2



@pytest.mark.parametrize("shape", [(24, 80), (80, 24)])
def test_svd_linear_equals_truncated_svd(shape):
    """Both factorisations (out <= in and out > in) give the rank-t truncated SVD product."""
    from detect.models.fast_rcnn import _svd_linear

    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0])
    u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    reference = (u[:, :10] * s[:10]) @ vh[:10]  # [out, in]
    with torch.no_grad():
        pair = _svd_linear(layer, 10)
    assert pair[0].weight.shape == (10, shape[1]) and pair[1].weight.shape == (shape[0], 10)
    product = pair[1].weight.double() @ pair[0].weight.double()
    torch.testing.assert_close(product, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(pair[1].bias, layer.bias)

def test_svd_needs_fc_layers():
    backbone = tiny_backbone()
    backbone.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    backbone.head_dim = 32
    model = FastRCNN(backbone=backbone, class_names=["a"])
    with pytest.raises(ValueError, match="fc6"):
        model.apply_svd()


# ----------------------------------------------------------------------------------------------
# Training data and wiring
# ----------------------------------------------------------------------------------------------


def make_scene(path, objects: list[tuple[int, list[float]]], size=(96, 128), seed=0) -> ImageRecord:
    """Write a PNG of coloured rectangles on noise; objects are (class, xyxy)."""
    rng = np.random.default_rng(seed)
    image = (rng.random((*size, 3)) * 80 + 60).astype(np.uint8)
    for cls, (x1, y1, x2, y2) in objects:
        image[int(y1):int(y2), int(x1):int(x2)] = COLOURS[cls]
    Image.fromarray(image).save(path)
    boxes = np.array([b for _, b in objects], np.float32).reshape(-1, 4)
    return ImageRecord(image_id=seed + 1, file_name=str(path), width=size[1], height=size[0], gt_boxes=boxes,
                       gt_classes=np.array([c for c, _ in objects], np.int64),
                       gt_difficult=np.zeros(len(objects), bool))


def scene_records(tmp_path) -> list[ImageRecord]:
    layouts = [[(1, [10, 10, 50, 60]), (2, [70, 30, 120, 80])],
               [(2, [5, 40, 45, 90]), (1, [60, 5, 110, 45])],
               [(1, [30, 20, 90, 70])],
               []]
    return [make_scene(tmp_path / f"{i}.png", objs, seed=i) for i, objs in enumerate(layouts)]


def proposals_for(records: list[ImageRecord]):
    table = {}
    for r in records:
        g = torch.Generator().manual_seed(r.image_id)
        gt = torch.from_numpy(r.gt_boxes)
        boxes = torch.cat([jitter(gt, 12, 0.25, g), random_boxes(40, 100, g)]).clamp(0, 127)
        table[r.image_id] = boxes.numpy()
    return table.__getitem__


def make_data(records, get_proposals, **kwargs) -> FastRCNNTrainData:
    options = dict(records=records, get_proposals=get_proposals, pixel_mean=(0.5,) * 3, pixel_std=(0.25,) * 3,
                   images_per_batch=2, rois_per_image=16, scales=[96, 112], max_size=200, seed=3)
    options.update(kwargs)
    return FastRCNNTrainData(**options)


def test_train_data_is_deterministic_and_sliced_by_rank(tmp_path):
    records = scene_records(tmp_path)
    get = proposals_for(records)
    data = make_data(records, get)
    a, b = data.batch(5), make_data(records, get).batch(5)  # a fresh object: as after a resume
    assert a.image_ids == b.image_ids and torch.equal(a.images, b.images) and torch.equal(a.rois, b.rois)
    assert a.images.shape[0] == 2 and a.rois.shape[1] == 5
    assert set(a.rois[:, 0].tolist()) <= {0.0, 1.0} and a.labels.shape[0] == a.rois.shape[0]
    # every image appears once per epoch (4 records = 2 batches of 2)
    assert sorted(data.batch(0).image_ids + data.batch(1).image_ids) == [1, 2, 3, 4]
    # two ranks of one image each see the slots of the single-process batch of two
    for rank in (0, 1):
        part = make_data(records, get, images_per_batch=1, rank=rank, world_size=2).batch(5)
        assert part.image_ids == [a.image_ids[rank]]
        torch.testing.assert_close(part.rois[:, 1:], a.rois[a.rois[:, 0] == rank, 1:])
    # rois stay inside the (resized) images
    h, w = a.images.shape[2:]
    assert (a.rois[:, 1:] >= -1e-3).all() and (a.rois[:, [1, 3]] <= w + 1e-3).all()
    assert (a.rois[:, [2, 4]] <= h + 1e-3).all()


def test_train_data_skips_unreadable_images(tmp_path):
    records = scene_records(tmp_path)
    (tmp_path / "1.png").write_bytes(b"broken")
    data = make_data(records, proposals_for(records))
    ids, skipped = [], []
    for it in range(4):
        batch = data.batch(it)
        ids += batch.image_ids
        skipped += batch.skipped_files
    assert 2 not in ids and len(ids) == 8
    assert len(skipped) == 1 and "1.png" in skipped[0]


def test_build_optimizer_bias_groups():
    model = tiny_model()
    model.body[0].weight.requires_grad_(False)
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    weights, biases = opt.param_groups
    assert weights["lr"] == 0.01 and weights["weight_decay"] == 5e-4
    assert biases["lr"] == 0.02 and biases["weight_decay"] == 0.0 and biases["lr_scale"] == 2.0
    assert all(p is not model.body[0].weight for p in weights["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(
        1 for p in model.parameters() if p.requires_grad)


def test_checkpoint_round_trip_with_svd():
    cfg = Config()
    cfg.model.backbone, cfg.model.weights, cfg.model.freeze_at = "efficientnet_lite0", "none", ""
    cfg.model.head_dim, cfg.model.roi_size = 32, 3
    cfg.test.scale, cfg.test.max_size = 64, 96
    torch.manual_seed(0)
    model = build_fast_rcnn(cfg, ["a", "b"]).eval()
    ckpt = {"kind": "fast_rcnn", "config": to_dict(cfg), "class_names": ["a", "b"], "model": model.state_dict()}
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    proposals = torch.tensor([[0.0, 0.0, 30.0, 40.0], [10.0, 5.0, 60.0, 45.0]])
    reference = model.score_proposals(image, proposals)
    loaded = build_from_checkpoint(ckpt)
    assert loaded.backbone_name == "efficientnet_lite0" and not loaded.training
    torch.testing.assert_close(loaded.score_proposals(image, proposals).scores, reference.scores)
    ckpt["config"]["test"].update(svd=True, svd_fc6=1000, svd_fc7=1000)  # full rank: same outputs
    svd = build_from_checkpoint(ckpt)
    assert isinstance(svd.head.fc6, nn.Sequential)
    torch.testing.assert_close(svd.score_proposals(image, proposals).scores, reference.scores,
                               rtol=1e-4, atol=1e-5)


def test_tiny_dataset_overfits(tmp_path):
    """3 scenes with 2 classes, gt-jittered proposals: AP50 close to 1 after 150 iterations."""
    from detect.evaluation.coco import evaluate_detections

    records = scene_records(tmp_path)
    get = proposals_for(records)
    data = make_data(records, get, rois_per_image=32, scales=[96])
    model = tiny_model(test_scale=96, test_max_size=200)
    optimizer = build_optimizer(model, lr=0.02, momentum=0.9, weight_decay=1e-4)
    model.train()
    for iteration in range(150):
        batch = data.batch(iteration)
        losses = fast_rcnn_loss(*model(batch.images, batch.rois), batch.labels, batch.box_targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    model.eval()
    detections = {}
    for r in records:
        image = np.asarray(Image.open(r.file_name).convert("RGB"))
        detections[r.image_id] = model.detect(image, get(r.image_id))
    dataset = Dataset("scenes", records, ["red", "green"], [1, 2])
    metrics = evaluate_detections(dataset, detections)
    assert metrics["AP50"] > 0.9, metrics["AP50"]


def test_multi_scale_test_scores_each_proposal_on_the_level_closest_to_224_squared():
    # 200 x 300 image, scales 100 and 400: factors 0.5 and 2 per axis.
    proposals = torch.tensor([[0.0, 0.0, 300.0, 200.0],  # area 60000: 15000 vs 240000 -> level 0
                              [10.0, 10.0, 30.0, 30.0],  # area 400: 100 vs 1600 -> level 1
                              [0.0, 0.0, 112.0, 112.0],  # 3136 vs 50176 exactly -> level 1
                              [50.0, 0.0, 250.0, 150.0]])  # area 30000: 7500 vs 120000 -> level 0
    factors = torch.tensor([[0.5, 0.5], [2.0, 2.0]])
    assert assign_levels(proposals, factors).tolist() == [0, 1, 1, 0]
    assert assign_levels(proposals, factors[:1]).tolist() == [0, 0, 0, 0]

    image = (np.random.default_rng(1).random((200, 300, 3)) * 255).astype(np.uint8)
    pyramid = tiny_model(test_scales=[100, 400], test_max_size=1000).eval()
    out = pyramid.score_proposals(image, proposals)
    for level, size in enumerate([100, 400]):
        single = tiny_model(test_scale=size, test_max_size=1000).eval().score_proposals(image, proposals)
        rows = [0, 3] if level == 0 else [1, 2]
        torch.testing.assert_close(out.scores[rows], single.scores[rows])
        torch.testing.assert_close(out.deltas[rows], single.deltas[rows])
    # one scale in the list is the single-scale model
    one = tiny_model(test_scales=[100], test_max_size=1000).eval().score_proposals(image, proposals)
    torch.testing.assert_close(one.scores, tiny_model(test_scale=100, test_max_size=1000).eval()
                               .score_proposals(image, proposals).scores)


def test_difficult_objects_are_trained_on_by_default_and_crowd_boxes_never(tmp_path):
    record = make_scene(tmp_path / "d.png", [(1, [10, 10, 50, 60]), (2, [70, 30, 120, 80])])
    record.gt_difficult = np.array([True, False])  # the red box is VOC difficult
    proposals = {record.image_id: np.array([[10, 10, 50, 60], [11, 9, 50, 61], [70, 30, 120, 80]], np.float32)}

    def labels(use_difficult: bool) -> set[int]:
        data = FastRCNNTrainData(records=[record], get_proposals=proposals.__getitem__, pixel_mean=(0.5,) * 3,
                                 pixel_std=(0.25,) * 3, images_per_batch=1, rois_per_image=16, scales=[96],
                                 max_size=200, flip=False, fg_fraction=1.0, use_difficult=use_difficult)
        return set(data.batch(0).labels.tolist()) - {0}  # the foreground classes sampled

    assert labels(True) == {1, 2}  # fast-rcnn pascal_voc.py keeps difficult objects
    assert labels(False) == {2}
    record.gt_crowd = np.array([True, False])  # a COCO crowd box is never an object to learn
    assert labels(True) == {2}


def test_output_layers_stay_float32_under_autocast():
    """The head may run in bf16 under autocast; the logits and deltas come out of float32
    layers (bf16 logits would quantise the softmax scores into ties)."""
    model = tiny_model().eval()
    features = torch.randn(1, 32, 6, 6)
    rois = torch.tensor([[0.0, 0, 0, 40, 40], [0.0, 8, 8, 90, 70]])
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        head_out = model.head(torch.randn(2, 32, 4, 4))
        logits, deltas = model.roi_heads(features, rois)
    assert head_out.dtype == torch.bfloat16  # autocast is really on for the head's Linear layers
    assert logits.dtype == torch.float32 and deltas.dtype == torch.float32
    with torch.no_grad():
        ref_logits, ref_deltas = model.roi_heads(features, rois)
    torch.testing.assert_close(logits, ref_logits, atol=0.05, rtol=0.05)
    torch.testing.assert_close(deltas, ref_deltas, atol=0.05, rtol=0.05)


def test_eval_period_logs_val_metrics(tmp_path):
    """train.eval_period: COCO AP / AP50 of the model being trained on data.val, in log.jsonl."""
    train = make_square_dataset(tmp_path / "data", num_images=2, name="train")
    val = make_square_dataset(tmp_path / "data", num_images=2, name="val", seed=1)
    cfg = from_dict(frcn_config(train, val, max_iter=4, checkpoint_period=4, eval_period=2))
    train_from_config(cfg, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval" in r]
    assert [r["iteration"] for r in evals] == [2]  # the final model is evaluated by `detect train`
    assert set(evals[0]["eval"]) == {"AP", "AP50", "skipped_images"}
    assert 0.0 <= evals[0]["eval"]["AP50"] <= 1.0 and evals[0]["eval"]["skipped_images"] == 0


@pytest.mark.parametrize("size", [161, 167, 175])
def test_roi_features_do_not_move_with_image_size_parity(size):
    """efficientnet_lite0 pads TensorFlow-"same" style: a stride-2 layer pads an odd-sized input
    one pixel more on the left and top, moving the feature grid against the RoI coordinates.
    ``FastRCNN.features`` pads images to a multiple of the stride on the right and bottom, so
    the same content, with zeros added on the right and bottom, gives the same RoI features
    (up to rounding: zeros beyond the content reach the RoI through the deep layers), where
    the body alone moves them (measured with the ImageNet weights: about 14 px at stride 16
    between a 160 and a 161 px image)."""
    from detect.models.backbones import build_backbone

    torch.manual_seed(0)
    model = FastRCNN(backbone=build_backbone("efficientnet_lite0", weights="none", head_dim=32, roi_size=4),
                     class_names=["a"]).eval()
    content = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    grown = torch.zeros(1, 3, size, size)
    grown[..., :160, :160] = content  # zeros in normalised space, as a padded training batch
    roi = torch.tensor([[0.0, 16, 16, 80, 80]])  # far from the right and bottom edges
    with torch.no_grad():
        maps = [model.features(x) for x in (content, grown)]
        assert [m.shape[-1] for m in maps] == [10, -(-size // 16)]  # ceil(size / stride)
        pooled = [roi_align(m, roi, 4, 1 / 16, sampling_ratio=2, aligned=True) for m in maps]
        shifted = roi_align(model.body(grown), roi, 4, 1 / 16, sampling_ratio=2, aligned=True)
    scale = pooled[0].abs().max()  # random weights: small activations, so relative errors
    assert (pooled[1] - pooled[0]).abs().max() < 0.01 * scale  # (the far border leaks in a little)
    assert (shifted - pooled[0]).abs().max() > 0.1 * scale  # the body alone: the grid moves
