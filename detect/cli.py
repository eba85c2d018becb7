"""The ``detect`` command: the flags of each subcommand (handlers: ``detect.commands``).

Expected errors (bad config, dataset or checkpoint, a full disk) print one line and exit with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from detect import commands, demo
from detect.common.config import ConfigError
from detect.data.images import ImageReadError
from detect.evaluation.recall import RECALL_TOP_KS
from detect.evaluation import proposal_tuning as tuning


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.lr=0.01 data.train.path=...")


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--data", help="COCO instances JSON, or a VOC dataset folder with --format voc")
    g.add_argument("--images", default="", help="COCO image folder (default: beside the JSON)")
    g.add_argument("--format", default="coco", choices=["coco", "voc"])
    g.add_argument("--split", default="", help="VOC split in ImageSets/Main (e.g. test)")
    g.add_argument("--classes", default="",
                   help="VOC: a text file of class names, one a line, in class order (default: the "
                        "20 VOC classes when all names are VOC's, else the sorted names in the split; "
                        "eval --checkpoint: the checkpoint's classes)")


def _add_ablation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("test-time ablations (no retraining)")
    g.add_argument("--no-box-regression", action="store_true",
                   help="score the proposals' own boxes (zero deltas): what regression buys")
    g.add_argument("--top-k", type=int, default=-1,
                   help="use the first K proposals per image (0: all; default: the checkpoint's setting)")
    g.add_argument("--svd", choices=["config", "on", "off"], default="config",
                   help="Fast R-CNN truncated SVD of fc6/fc7 (default: as the checkpoint's config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detect",
        description="Selective search, R-CNN and Fast R-CNN: propose, train, evaluate, detect, compare.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-synthetic", help="write the built-in synthetic COCO-format dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=200, help="number of training images")
    p.add_argument("--val", type=int, default=50, help="number of validation images")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("propose", help="selective-search proposals for a dataset or image folder")
    _add_dataset_args(p)
    p.add_argument("--input", nargs="*", default=[],
                   help="image files, folders (searched recursively) or globs, instead of --data; image "
                        "ids are 1-based positions in sorted order. Put key=value overrides before --input")
    p.add_argument("--out", required=True,
                   help="proposal store folder (format: detect/proposals/store.py); work in progress is kept "
                        "in OUT.partial/, re-run the same command to resume")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--export", nargs=2, metavar=("FORMAT", "FILE"), default=None,
                   help="also write the store as FILE for FORMAT detectron2 (PROPOSAL_FILES_*) or mmdet "
                        "(proposal_file): precomputed-proposal pickles those frameworks read")
    p.add_argument("--shard", default="",
                   help="i/N: compute only chunks k with k %% N == i (job arrays); the last shard to finish "
                        "merges. Under torchrun the rank and world size are used automatically")
    _add_config_args(p)

    p = sub.add_parser("recall", help="proposal recall and MABO against ground truth")
    _add_dataset_args(p)
    p.add_argument("--proposals", required=True, help="proposal store folder (from `detect propose`)")
    p.add_argument("--out", default="", help="write the figures as JSON here (recall.json)")
    p.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="draw N images (the first with ground truth): each ground-truth box, its best "
                        "proposal with the IoU, and in red the boxes no proposal reaches at IoU 0.5")
    p.add_argument("--vis-dir", default="", help="where the drawings go (default: recall_vis/ beside --out, "
                                                  "else in the current folder)")
    p.add_argument("--top-k", type=int, default=RECALL_TOP_KS[-1],
                   help="the budget the detectors will score (proposals.top_k; 0: all): the low-recall "
                        "warning and the drawings use the first K boxes (default: %(default)s)")

    p = sub.add_parser("tune-proposals", help="choose selective-search settings that reach a recall target "
                                              "on a training split (writes a proposals: block)")
    _add_dataset_args(p)
    p.add_argument("--out", required=True, help="the proposals: block (YAML); .md, .png and .json beside it")
    p.add_argument("--num-images", type=int, default=50, help="training images sampled (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--target-recall", type=float, default=0.9, help="recall to reach")
    p.add_argument("--target-iou", type=float, default=0.5, help="at this IoU (0.5 to 0.95)")
    p.add_argument("--max-boxes", type=int, default=2000, help="within this many boxes per image (top_k)")
    p.add_argument("--probe-images", type=int, default=5,
                   help="every search runs on these first; the cheapest go on to the whole sample")
    p.add_argument("--exhaustive", action="store_true",
                   help="run every search on the whole sample (default: stop at the cheapest that reaches "
                        "the target, skip hopeless ones)")
    p.add_argument("--modes", nargs="+", default=list(tuning.MODES), choices=list(tuning.MODES))
    p.add_argument("--resizes", nargs="+", type=int, default=list(tuning.RESIZES),
                   help="sizes of the resized side (proposals.resize_side); 0 = native")
    p.add_argument("--k-scales", nargs="+", type=float, default=list(tuning.K_SCALES))
    p.add_argument("--min-sizes", nargs="+", type=int, default=list(tuning.MIN_SIZES))
    p.add_argument("--nms-ious", nargs="*", type=float, default=list(tuning.NMS_IOUS),
                   help="IoUs of the nms ranking to try (the paper's ranking is always tried)")
    p.add_argument("--cache", default="", help="search cache folder (default: OUT.cache)")
    p.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="draw N sampled images with the chosen settings' proposals, as `detect recall "
                        "--visualize` (into OUT_vis/)")
    _add_config_args(p)

    p = sub.add_parser("eval", help="COCO mAP of a results file, or of a trained detector")
    _add_dataset_args(p)
    p.add_argument("--results", default="", help="COCO results JSON to score")
    p.add_argument("--checkpoint", default="", help="trained detector to run and score")
    p.add_argument("--proposals", default="", help="proposal store for --checkpoint")
    p.add_argument("--output-dir", default="", help="where metrics.json (and detections) go")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    p.add_argument("--metric", default="coco", choices=["coco", "voc07", "voc"],
                   help="table to print: COCO AP, VOC2007 11-point AP or VOC2010+ all-point AP "
                        "(metrics.json holds all three)")
    _add_ablation_args(p)

    p = sub.add_parser("bench", help="time detectors interleaved image by image (medians, ratio intervals)")
    p.add_argument("checkpoints", nargs="+", help="two or more trained detectors (runs' model_final.pt)")
    _add_dataset_args(p)
    p.add_argument("--proposals", default="",
                   help="proposal store for --data (default: selective search once per image, timed as "
                        "the shared 'proposals' stage)")
    p.add_argument("--warmup", type=int, default=3, help="first N images run but not counted")
    p.add_argument("--limit", type=int, default=0, help="time only the first N images (0: all)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the ratio intervals")
    p.add_argument("--output", default="bench.json", help="where the result goes (JSON)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch and OpenCV (0: their defaults). 1 keeps the ratio steady "
                        "on a shared machine: another process then slows both detectors alike")
    _add_ablation_args(p)

    p = sub.add_parser("train", help="train a detector from a config")
    _add_config_args(p, required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    p = sub.add_parser("predict", help="detect objects in image files, folders or globs")
    p.add_argument("--checkpoint", required=True, help="a trained detector (a run's model_final.pt)")
    p.add_argument("--input", nargs="+", required=True,
                   help="image files, folders (searched recursively) or globs")
    p.add_argument("--output-dir", required=True,
                   help="detections.json/.jsonl, images.json, errors.json, summary.json; "
                        "re-run into the same folder to resume")
    p.add_argument("--score-threshold", type=float, default=0.5, help="drop detections below this")
    p.add_argument("--workers", type=int, default=0,
                   help="processes reading images and proposing ahead of the detector (default: all cores)")
    p.add_argument("--proposals", default="",
                   help="proposal store made by `detect propose --input` on the same inputs "
                        "(instead of selective search)")
    p.add_argument("--visualize", action="store_true", help="also write vis/*.jpg with boxes drawn")

    p = sub.add_parser("compare", help="side-by-side report of evaluated runs")
    p.add_argument("runs", nargs="+", help="run folders (outputs of `detect train`/`detect eval`)")
    p.add_argument("--output-dir", required=True, help="where report.md, report.html and PNGs go")
    _add_dataset_args(p)  # --data: the detection grid's dataset (default: the first run's)
    p.add_argument("--grid-images", type=int, default=4, help="val images in the detection grid")
    p.add_argument("--bench", default="",
                   help="bench.json from `detect bench` on these runs' checkpoints: the speed section uses "
                        "it (default: the runs' own per-image medians)")
    p.add_argument("--proposals", default="",
                   help="proposal store the viewer draws for every run (default: each run's own, as its "
                        "metrics.json names it)")

    p = sub.add_parser("demo", help="the whole story on the synthetic dataset (README's main command)")
    p.add_argument("--output-dir", default="runs/demo")
    for name in ("eval", "bench", "train", "predict", "demo"):
        sub.choices[name].add_argument("--device", default="", help="cuda or cpu (default: cuda if available)")
    return parser


COMMANDS = {"make-synthetic": commands.make_synthetic, "propose": commands.propose, "recall": commands.recall,
            "tune-proposals": commands.tune_proposals, "eval": commands.evaluate, "bench": commands.bench,
            "train": commands.train, "predict": commands.predict, "compare": commands.compare,
            "demo": lambda args: demo.run_demo(args.output_dir, device=args.device, run_command=main)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    # A warning is one line, as an error is (not Python's header and source line).
    warnings.showwarning = lambda message, *_: print(f"detect {args.command}: warning: {message}", file=sys.stderr)
    try:
        return COMMANDS[args.command](args) or 0
    except (ConfigError, ImageReadError, OSError, ValueError) as e:
        print(f"detect {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detect {args.command}: interrupted; finished outputs are kept, re-run to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
