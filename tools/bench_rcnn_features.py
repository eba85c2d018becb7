"""R-CNN's test-time feature pass: the trained net as it is against its inference copy.

    python tools/bench_rcnn_features.py --checkpoint RUN/model_final.pt --data val.json \
        --proposals STORE --threads 1 --reps 3

For each image (its first ``proposals.top_k`` proposals, warped once), it times the CNN on the
crops two ways, interleaved image by image in one process so that a busy machine slows both
alike:

- ``reference``: ``RCNN.net`` in eval mode on NCHW crops (the pass before the inference copy);
- ``inference``: ``RCNN.inference_net()``, ``detect.models.rcnn.inference_net``: BatchNorm
  folded into the convs, static padding, channels-last.

Both run in chunks of the checkpoint's ``rcnn.test_chunk`` crops. It prints the median
seconds per image of each, the median per-image ratio with a 95% bootstrap interval, and the
largest relative difference of the fc7 and pool5 features (float rounding only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from detect.data.datasets import load_coco
from detect.data.images import read_image
from detect.models.build import load_detector
from detect.models.rcnn import normalize_image, warp_regions
from detect.proposals.selective_search import first_proposals
from detect.proposals.store import ProposalStore


def run_net(net, crops: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    pool5, fc7 = zip(*(net(crops[s:s + chunk]) for s in range(0, crops.shape[0], chunk)))
    return torch.cat(pool5).flatten(1), torch.cat(fc7)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="COCO JSON (file names relative to its folder)")
    parser.add_argument("--proposals", required=True, help="proposal store of --data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3, help="timed passes per image and method")
    parser.add_argument("--limit", type=int, default=0, help="first N images (0: all)")
    parser.add_argument("--output", default="", help="also write the result as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    detector = load_detector(args.checkpoint, "cpu")
    dataset, store = load_coco(args.data), ProposalStore(args.proposals)
    records = dataset.records[:args.limit or None]
    methods = {"reference": (detector.net.eval(), torch.contiguous_format),
               "inference": (detector.inference_net(), torch.channels_last)}
    times = {name: [] for name in methods}
    diff = {"pool5": 0.0, "fc7": 0.0}
    with torch.no_grad():
        for index, record in enumerate(records):
            boxes = torch.from_numpy(first_proposals(store.get(record.image_id), detector.proposal_top_k)).float()
            image = normalize_image(read_image(record.file_name), pixel_mean=detector.pixel_mean,
                                    pixel_std=detector.pixel_std, device=torch.device("cpu"))
            crops = warp_regions(image, boxes, crop_size=detector.crop_size, context_pad=detector.context_pad)
            out = {}
            for rep in range(args.reps + (index == 0)):  # the first image's first pass warms up
                for name, (net, layout) in methods.items():
                    x = crops.contiguous(memory_format=layout)
                    t0 = time.perf_counter()
                    out[name] = run_net(net, x, detector.test_chunk)
                    if not (index == 0 and rep == 0):
                        times[name].append((index, time.perf_counter() - t0))
            for k, (ref, new) in zip(diff, zip(out["reference"], out["inference"])):
                diff[k] = max(diff[k], float((ref - new).abs().max() / ref.abs().max().clamp_min(1e-12)))
    per_image = {name: [statistics.median(t for i, t in values if i == index) for index in range(len(records))]
                 for name, values in times.items()}
    ratios = np.array(per_image["reference"]) / np.array(per_image["inference"])
    rng = np.random.default_rng(0)
    boot = [np.median(rng.choice(ratios, len(ratios))) for _ in range(2000)]
    result = {"images": len(records), "threads": args.threads, "proposals_per_image": detector.proposal_top_k,
              "crop_size": detector.crop_size, "test_chunk": detector.test_chunk,
              "median_s": {name: statistics.median(v) for name, v in per_image.items()},
              "ratio": float(np.median(ratios)), "ratio_95ci": [float(np.percentile(boot, 2.5)),
                                                               float(np.percentile(boot, 97.5))],
              "max_relative_difference": diff}
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
