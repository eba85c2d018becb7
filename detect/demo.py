"""``detect demo``: the whole story on the built-in synthetic dataset, resumable.

make the dataset -> selective search for train and val -> proposal recall -> train and evaluate
Fast R-CNN -> train and evaluate R-CNN (all four stages) -> ``detect predict`` on a few val
images with drawings -> ``detect compare``. Each step prints the ``detect`` command it runs, so
the demo doubles as a tour of the CLI, and each step is skipped when its output is complete:
re-running the demo reuses what is finished.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Demo sizes: the whole story in under 30 minutes on 2 CPU cores. The configs' own schedules
# (configs/*_synthetic_cpu.yaml: ~10 min for Fast R-CNN, ~15 min for R-CNN) are halved here;
# `detect train` with the configs alone gives the figures in the README's benchmark table.
NUM_TRAIN, NUM_VAL, SEED = 80, 30, 0
NUM_PREDICT = 6
SHORT_SCHEDULE = {
    "fast_rcnn": ["train.max_iter=300", "train.steps=[225]", "train.checkpoint_period=100"],
    "rcnn": ["rcnn.ft_max_iter=100", "rcnn.ft_steps=[75]"],
}


def _run(argv: list[str]) -> None:
    from detect.cli import main

    print(f"\n$ detect {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise SystemExit(f"demo: `detect {shlex.join(argv)}` failed with status {code}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def cli_demo(args) -> int:
    out = Path(args.output_dir)
    data = out / "data"
    device = ["--device", args.device] if args.device else []
    t0 = time.perf_counter()

    if not (data / "val.json").is_file():
        _run(["make-synthetic", "--out", str(data), "--train", str(NUM_TRAIN), "--val", str(NUM_VAL),
              "--seed", str(SEED)])
    stores = {}
    for split in ("train", "val"):
        stores[split] = out / "proposals" / split
        if not (stores[split] / "meta.json").is_file():
            _run(["propose", "--data", str(data / f"{split}.json"), "--out", str(stores[split]), "--config", str(CONFIGS / "fast_rcnn_synthetic_cpu.yaml")])
    _run(["recall", "--data", str(data / "val.json"),
          "--proposals", str(stores["val"]), "--out", str(out / "proposals" / "val_recall.json")])

    data_overrides = [
        f"data.train.path={data / 'train.json'}", f"data.val.path={data / 'val.json'}",
        f"data.train_proposals={stores['train']}", f"data.val_proposals={stores['val']}",
    ]
    runs = []
    for name in ("fast_rcnn", "rcnn"):
        run_dir = out / name
        runs.append(str(run_dir))
        if not (run_dir / "metrics.json").is_file():
            _run(["train", "--config", str(CONFIGS / f"{name}_synthetic_cpu.yaml"), "--output-dir", str(run_dir),
                  "--resume", *device, *data_overrides, *SHORT_SCHEDULE[name]])

    val_images = sorted((data / "images" / "val").glob("*.png"))[:NUM_PREDICT]
    for name in ("fast_rcnn", "rcnn"):
        _run(["predict", "--checkpoint", str(out / name / "model_final.pt"), "--input", *map(str, val_images),
              "--output-dir", str(out / "predict" / name), "--visualize", *device])
    _run(["compare", *runs, "--output-dir", str(out / "report")])

    minutes = (time.perf_counter() - t0) / 60
    print(f"\ndemo finished in {minutes:.1f} min")
    print(f"report:      {out / 'report' / 'report.html'} (and report.md)")
    print(f"predictions: {out / 'predict'}/<detector>/vis/")
    return 0
