"""R-CNN's test-time pass, old against new, on one trained checkpoint, interleaved image by image.

"old" is ``reference_scores``: the pass as it was before ``detect.models.backbones.inference_copy``
(the trained ``detector.net`` itself, NCHW, BatchNorm unfolded, chunks of ``--old-chunk``).
"new" is ``RCNN.score_proposals`` (folded, channels-last, chunks of ``--new-chunk``). For each
thread count, every image is scored by both, the order alternating image by image, so load on
a shared machine slows both alike. Reported: median ms/image of each, the median of the
per-image ratios old / new with a bootstrap 95% interval, the largest score and delta
difference, and COCO AP of both passes' detections (the one ``postprocess``).

    python tools/bench_rcnn_features.py RUN/model_final.pt --data /tmp/nuclei/val.json \
        --proposals /tmp/nuclei_props/val --threads 1 2 --output bench_rcnn_features.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import cv2
import numpy as np
import torch

from detect.data.datasets import load_coco
from detect.data.images import read_image
from detect.evaluation.coco import evaluate_detections
from detect.models.build import load_detector
from detect.models.detector import ProposalScores, postprocess
from detect.models.rcnn import RCNN, normalize_image, warp_regions
from detect.proposals.selective_search import first_proposals
from detect.proposals.store import ProposalStore


@torch.no_grad()
def reference_scores(detector: RCNN, image: np.ndarray, proposal_boxes: torch.Tensor, chunk: int) -> ProposalScores:
    """The pass before the speed-up: ``detector.net`` on NCHW crops, BatchNorm unfolded."""
    num_classes = detector.num_classes
    image_t = normalize_image(image, pixel_mean=detector.pixel_mean, pixel_std=detector.pixel_std,
                              device=detector.device)
    bbox_weight = detector.bbox_weight.permute(1, 0, 2).reshape(detector.bbox_weight.shape[1], -1)  # [D5, K * 4]
    scores, deltas = [], []
    for start in range(0, proposal_boxes.shape[0], chunk):
        crops = warp_regions(image_t, proposal_boxes[start:start + chunk], crop_size=detector.crop_size,
                             context_pad=detector.context_pad)
        pool5, fc7 = detector.net(crops)
        scores.append(torch.sigmoid((fc7 * detector.feat_scale) @ detector.svm_weight.T + detector.svm_bias))
        d = (pool5.flatten(1) @ bbox_weight).view(-1, num_classes, 4) + detector.bbox_bias  # [r, K, 4]
        deltas.append(d * detector.bbox_target_std + detector.bbox_target_mean)
    return ProposalScores(proposal_boxes, torch.cat(scores), torch.cat(deltas))


def _bootstrap(ratios: list[float], resamples: int, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    r = np.asarray(ratios)
    medians = np.median(r[rng.integers(0, len(r), (resamples, len(r)))], axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="COCO instances JSON")
    p.add_argument("--proposals", required=True, help="proposal store of --data")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--old-chunk", type=int, default=0, help="0: the checkpoint's rcnn.test_chunk")
    p.add_argument("--new-chunk", type=int, default=0, help="0: the checkpoint's rcnn.test_chunk")
    p.add_argument("--limit", type=int, default=0, help="first N images (0: all)")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--output", default="")
    args = p.parse_args()

    detector = load_detector(args.checkpoint, "cpu")
    if not isinstance(detector, RCNN):
        raise SystemExit(f"{args.checkpoint}: not an R-CNN checkpoint")
    old_chunk = args.old_chunk or detector.test_chunk
    detector.test_chunk = args.new_chunk or detector.test_chunk
    dataset = load_coco(args.data)
    store = ProposalStore(args.proposals)
    records = dataset.records[:args.limit] if args.limit else dataset.records
    items = [(r.image_id, read_image(r.file_name), torch.from_numpy(np.ascontiguousarray(
        first_proposals(store.get(r.image_id), detector.proposal_top_k), dtype=np.float32)))
        for r in records]

    result = {"checkpoint": str(args.checkpoint), "images": len(items), "old_chunk": old_chunk,
              "new_chunk": detector.test_chunk, "proposals_per_image": statistics.mean(len(b) for _, _, b in items),
              "load_average": os.getloadavg(), "runs": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        reference_scores(detector, *items[0][1:], old_chunk)  # warm-up: oneDNN kernels, the inference copy
        detector.score_proposals(*items[0][1:])
        times = {"old": [], "new": []}
        dets = {"old": {}, "new": {}}
        max_diff = {"scores": 0.0, "deltas": 0.0}
        for i, (image_id, image, boxes) in enumerate(items):
            outs = {}
            for which in (("old", "new") if i % 2 == 0 else ("new", "old")):
                t0 = time.perf_counter()
                outs[which] = (reference_scores(detector, image, boxes, old_chunk) if which == "old"
                               else detector.score_proposals(image, boxes))
                times[which].append(time.perf_counter() - t0)
            for which, out in outs.items():
                dets[which][image_id] = postprocess(out, image.shape[0], image.shape[1],
                                                    score_thresh=detector.score_thresh, nms_thresh=detector.nms_thresh,
                                                    detections_per_image=detector.detections_per_image,
                                                    per_class_top_k=detector.per_class_top_k)
            max_diff["scores"] = max(max_diff["scores"], (outs["old"].scores - outs["new"].scores).abs().max().item())
            max_diff["deltas"] = max(max_diff["deltas"], (outs["old"].deltas - outs["new"].deltas).abs().max().item())
        ratios = [a / b for a, b in zip(times["old"], times["new"])]
        low, high = _bootstrap(ratios, args.resamples)
        metrics = {w: evaluate_detections(dataset, d) for w, d in dets.items()}
        run = {"old_ms": 1e3 * statistics.median(times["old"]), "new_ms": 1e3 * statistics.median(times["new"]),
               "ratio": statistics.median(ratios), "ratio_95": [low, high], "max_abs_diff": max_diff,
               "AP": {w: {k: metrics[w][k] for k in ("AP", "AP50", "AP75")} for w in metrics}}
        result["runs"][str(threads)] = run
        print(f"threads {threads}: old {run['old_ms']:.0f} ms/image, new {run['new_ms']:.0f} ms/image, "
              f"old/new {run['ratio']:.2f} [{low:.2f}, {high:.2f}]; max |diff| scores {max_diff['scores']:.2e} "
              f"deltas {max_diff['deltas']:.2e}; AP old {run['AP']['old']} new {run['AP']['new']}", flush=True)
    result["load_average_end"] = os.getloadavg()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
