"""The one ``Detector`` interface and the one post-processing path both detectors share.

R-CNN and Fast R-CNN differ only in ``score_proposals``, per-class scores and box deltas of an
image's proposals (fast-rcnn's ``im_detect``); everything after that is ``postprocess``.

Shapes: R proposals, K object classes (background is not a column), D detections.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detect.common.boxes import clip_boxes, decode_boxes
from detect.proposals.selective_search import first_proposals, selective_search


@dataclass
class ProposalScores:
    """What a detector says about each proposal of one image: ``scores[r, k - 1]`` of class k for
    proposal r (a softmax probability or a squashed SVM margin; higher is better) and its
    un-normalised box regression ``deltas[r, k - 1]`` (tx, ty, tw, th) from ``proposal_boxes[r]``.
    """

    proposal_boxes: Tensor  # [R, 4] xyxy, original-image pixels
    scores: Tensor  # [R, K]
    deltas: Tensor  # [R, K, 4]


@dataclass
class Detections:
    """Final detections of one image."""

    boxes: Tensor  # [D, 4] xyxy, original-image pixels
    scores: Tensor  # [D]
    labels: Tensor  # [D] int64 class indices in 1..K

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to(self, device: torch.device | str) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))

    @staticmethod
    def empty() -> "Detections":
        return Detections(torch.zeros((0, 4)), torch.zeros((0,)), torch.zeros((0,), dtype=torch.int64))


def postprocess(out: ProposalScores, image_height: int, image_width: int, *,
                score_thresh: float = 0.05, nms_thresh: float = 0.3,
                detections_per_image: int = 100, per_class_top_k: int = 0) -> Detections:
    """Decode, clip, threshold, keep the top ``per_class_top_k`` of each class (0 = all),
    per-class NMS, keep the top ``detections_per_image`` over all classes (0 = all): both
    detectors' last step (torchvision's ``postprocess_detections``; caps:
    ``detect.common.config.TestConfig``). Ties at a cap are broken by order (a stable sort).
    """
    scores = out.scores.float()  # [R, K]
    num_props, num_classes = scores.shape
    if num_props == 0:
        return Detections.empty().to(scores.device)
    boxes = clip_boxes(decode_boxes(out.deltas.float(), out.proposal_boxes.float()), image_height, image_width)
    labels = torch.arange(1, num_classes + 1, device=scores.device).expand(num_props, num_classes)

    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    keep = (scores > score_thresh) & (boxes[:, 2] - boxes[:, 0] > 1e-3) & (boxes[:, 3] - boxes[:, 1] > 1e-3)
    keep &= torch.isfinite(boxes).all(dim=1)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if per_class_top_k > 0:
        keep = _top_k_per_class(scores, labels, per_class_top_k)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)  # best score first
    if detections_per_image > 0:
        keep = keep[:detections_per_image]
    return Detections(boxes[keep], scores[keep], labels[keep])


def _top_k_per_class(scores: Tensor, labels: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` best scores [D] of each label: sort by score, then (stably) by
    label, and keep the entries whose rank within their label is below ``k``."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]  # grouped by label, best first
    sorted_labels = labels[order]
    first = torch.searchsorted(sorted_labels, sorted_labels)  # where each label's run starts
    rank = torch.arange(len(order), device=scores.device) - first
    return order[rank < k]


class StageTimer:
    """Wall-clock milliseconds per named stage, summed over calls (on CUDA synchronised, so a
    stage's time is its own)."""

    def __init__(self, device: torch.device | str | None = None):
        self.totals_ms: dict[str, float] = {}
        self.sync = torch.device(device).type == "cuda" if device is not None else False

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.totals_ms[stage] = self.totals_ms.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3


class Detector(nn.Module):
    """Base class of ``FastRCNN`` and ``RCNN``, which implement ``_score``; complete after construction.

    ``detect`` trims the proposals to ``proposal_top_k`` (0 = all; None runs selective search
    with ``proposal_settings``), scores them and runs ``postprocess``. ``category_ids[k - 1]`` is
    the dataset category id of class k (default k); ``amp``: bf16/fp16 autocast on CUDA.
    """

    kind: str = ""

    def __init__(self, *, class_names: list[str], score_thresh: float = 0.05,
                 nms_thresh: float = 0.3, detections_per_image: int = 100, per_class_top_k: int = 0,
                 category_ids: list[int] | None = None, proposal_settings: dict | None = None,
                 proposal_top_k: int = 0, backbone_name: str = "", amp: bool = True,
                 box_regression: bool = True):
        super().__init__()
        if not class_names:
            raise ValueError("class_names must list at least one class")
        self.class_names = list(class_names)
        self.category_ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
        if len(self.category_ids) != len(self.class_names):
            raise ValueError(f"{len(self.category_ids)} category ids for {len(self.class_names)} classes")
        if proposal_top_k < 0:
            raise ValueError(f"proposal_top_k must be >= 0 (0 = all), got {proposal_top_k}")
        if detections_per_image < 0 or per_class_top_k < 0:
            raise ValueError(f"detections_per_image and per_class_top_k must be >= 0 (0 = no cap), got "
                             f"{detections_per_image} and {per_class_top_k}")
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.per_class_top_k = per_class_top_k
        self.proposal_settings = dict(proposal_settings or {})  # selective search's, when detect() gets None
        self.proposal_top_k = proposal_top_k
        self._inference: tuple[torch.device, nn.Module] | None = None  # a tuple, not a submodule
        self.backbone_name = backbone_name
        self.amp = amp
        self.box_regression = box_regression  # False: boxes are the proposals (an ablation, [RCNN] Table 2)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def train(self, mode: bool = True) -> Detector:
        self._inference = None  # the weights may change: rebuild the inference copy on next use
        return super().train(mode)

    def inference_module(self) -> nn.Module:
        """``make_inference_module()`` on the detector's device, rebuilt after ``.train()`` / ``.eval()``
        or a move (after changing the weights, call ``.eval()`` again)."""
        if self._inference is None or self._inference[0] != self.device:
            self._inference = (self.device, self.make_inference_module())
        return self._inference[1]

    def make_inference_module(self) -> nn.Module:
        """The network ``score_proposals`` runs, as a ``detect.models.backbones.inference_copy``."""
        raise NotImplementedError

    @torch.no_grad()
    def score_proposals(self, image: np.ndarray, proposal_boxes: Tensor,
                        timer: StageTimer | None = None) -> ProposalScores:
        """Scores [R, K] and un-normalised deltas [R, K, 4] of proposals [R, 4] (xyxy, original
        pixels) of a uint8 RGB image [H, W, 3]. Zero proposals give empty outputs at once."""
        proposal_boxes = proposal_boxes.to(device=self.device, dtype=torch.float32).reshape(-1, 4)
        if proposal_boxes.shape[0] == 0:
            k = self.num_classes
            return ProposalScores(proposal_boxes, proposal_boxes.new_zeros((0, k)), proposal_boxes.new_zeros((0, k, 4)))
        return self._score(image, proposal_boxes, timer or StageTimer(self.device))

    def _score(self, image: np.ndarray, proposal_boxes: Tensor, timer: StageTimer) -> ProposalScores:
        """``score_proposals`` of R >= 1 proposals [R, 4] float32 on the detector's device."""
        raise NotImplementedError

    @torch.no_grad()
    def detect(self, image: np.ndarray, proposals: np.ndarray | Tensor | None = None,
               timer: StageTimer | None = None) -> Detections:
        """Detect objects in one uint8 RGB image [H, W, 3] (as ``read_image``) given proposals [R, 4] xyxy."""
        timer = timer or StageTimer(self.device)
        if proposals is None:
            with timer("proposals"):
                proposals = selective_search(image, **self.proposal_settings)
        proposals = first_proposals(proposals, self.proposal_top_k)  # [R, 4], best-ranked first
        out = self.score_proposals(image, torch.as_tensor(np.asarray(proposals, dtype=np.float32)), timer)
        if not self.box_regression:
            out = ProposalScores(out.proposal_boxes, out.scores, torch.zeros_like(out.deltas))  # [R, K, 4]
        with timer("postprocess"):
            dets = postprocess(out, image.shape[0], image.shape[1], score_thresh=self.score_thresh,
                               nms_thresh=self.nms_thresh, detections_per_image=self.detections_per_image,
                               per_class_top_k=self.per_class_top_k)
        return dets.to("cpu")
