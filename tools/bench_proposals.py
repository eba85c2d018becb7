"""Benchmark: our selective search (detect.proposals.ss) vs OpenCV's, both with the paper's settings.

One process, one thread for both (OpenCV cv2.setNumThreads(1), numba 1 thread, OMP / MKL /
OpenBLAS 1 thread), images resized to 500 px wide, measured interleaved image by image
(the engine that goes first alternates between repetitions), after warm-up.

Reports: the first-call JIT compile time (cold cache, in a subprocess with an empty
NUMBA_CACHE_DIR) and the cached load time; per image the median seconds of both engines and
their ratio; our per-stage split; boxes per image; latency at threads=1 vs 2 (interleaved);
and, on the toolkit's synthetic dataset (``detect make-synthetic``, COCO JSON), recall@0.5,
recall@0.7 and MABO of both engines (all boxes, and the toolkit's use: boxes with a side
under 20 original pixels dropped, first 2000 kept).

Usage (the synthetic data: ``detect make-synthetic --out runs/ss_data --train 1 --val 40``):
    .venv/bin/python tools/bench_proposals.py --data runs/ss_data --out runs/bench_proposals.json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent

from detect.common.box_ops import box_iou  # noqa: E402
from detect.evaluation.recall import greedy_match  # noqa: E402
from detect.data.datasets import Dataset, load_coco  # noqa: E402
from detect.data.images import read_image  # noqa: E402
from detect.evaluation.recall import proposal_recall  # noqa: E402
from detect.proposals.selective_search import opencv_selective_search, selective_search  # noqa: E402
from detect.proposals.ss.engine import selective_search_boxes, warm_up  # noqa: E402

STAGES = ("segmentation", "features", "grouping", "ranking")
PARTS = ("speed", "fidelity", "reference")


def resize_width(image: np.ndarray, width: int = 500) -> np.ndarray:
    h, w = image.shape[:2]
    if w == width:
        return image
    interpolation = cv2.INTER_AREA if width < w else cv2.INTER_LINEAR
    return cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=interpolation)


def read_rgb(path: str) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"cannot read {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def synthetic_photo(seed: int, height: int = 375, width: int = 500) -> np.ndarray:
    """Solid shapes over a textured, shaded background (uint8 RGB)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    base = rng.uniform(60, 180, 3)
    shade = 30 * np.sin(xx / rng.uniform(3, 9)) * np.cos(yy / rng.uniform(4, 11))
    image = base[None, None, :] + shade[:, :, None] + 20 * (yy / height)[:, :, None]
    image = image + rng.normal(0, 10, image.shape)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 60), rng.integers(0, height - 60)
        x1, y1 = x0 + rng.integers(30, 200), y0 + rng.integers(30, 150)
        colour = rng.uniform(0, 255, 3)
        if rng.random() < 0.5:
            image[y0:y1, x0:x1] = colour
        else:
            cy, cx, r = (y0 + y1) / 2, (x0 + x1) / 2, min(x1 - x0, y1 - y0) / 2
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def compile_seconds() -> dict:
    """warm_up() in fresh processes: with an empty numba cache (compile) and the normal one."""
    out = {}
    code = "from detect.proposals.ss.engine import warm_up; print(warm_up())"
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out["cold_compile_s"] = float(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                                     capture_output=True, text=True).stdout.split()[-1])
    out["cached_load_s"] = float(subprocess.run([sys.executable, "-c", code], check=True,
                                                capture_output=True, text=True).stdout.split()[-1])
    return out


def time_pair(image: np.ndarray, reps: int) -> dict:
    """Interleaved timings of both engines on one image."""
    ours, cv, stages, n_ours, n_cv = [], [], {s: [] for s in STAGES}, 0, 0
    for rep in range(reps):
        for engine in (("ours", "cv") if rep % 2 == 0 else ("cv", "ours")):
            if engine == "ours":
                timings = {}
                t0 = time.perf_counter()
                boxes, _ = selective_search_boxes(image, mode="fast", timings=timings)
                ours.append(time.perf_counter() - t0)
                for s in STAGES:
                    stages[s].append(timings[s])
                n_ours = len(boxes)
            else:
                t0 = time.perf_counter()
                boxes = opencv_selective_search(image, mode="fast")
                cv.append(time.perf_counter() - t0)
                n_cv = len(boxes)
    return {"ours_s": float(np.median(ours)), "opencv_s": float(np.median(cv)),
            "ratio": float(np.median(cv) / np.median(ours)),
            "stages_s": {s: float(np.median(v)) for s, v in stages.items()},
            "boxes_ours": n_ours, "boxes_opencv": n_cv}


def time_threads(image: np.ndarray, reps: int) -> dict:
    """Wall seconds at threads=1 and 2 (interleaved), and the process CPU seconds of the
    threads=2 runs (about 2x its wall time when both threads really ran at once)."""
    wall = {1: [], 2: []}
    cpu2 = []
    for rep in range(reps):
        for threads in ((1, 2) if rep % 2 == 0 else (2, 1)):
            c0, t0 = time.process_time(), time.perf_counter()
            selective_search_boxes(image, mode="fast", threads=threads)
            wall[threads].append(time.perf_counter() - t0)
            if threads == 2:
                cpu2.append(time.process_time() - c0)
    return {"threads1_s": float(np.median(wall[1])), "threads2_s": float(np.median(wall[2])),
            "threads2_cpu_s": float(np.median(cpu2))}


def time_quality(images: dict, reps: int) -> dict:
    """Quality mode, both engines, interleaved (seconds and boxes per image)."""
    out = {}
    for name, image in images.items():
        ours, cv = [], []
        for rep in range(reps):
            for engine in (("ours", "cv") if rep % 2 == 0 else ("cv", "ours")):
                t0 = time.perf_counter()
                if engine == "ours":
                    n_ours = len(selective_search_boxes(image, mode="quality")[0])
                    ours.append(time.perf_counter() - t0)
                else:
                    n_cv = len(opencv_selective_search(image, mode="quality"))
                    cv.append(time.perf_counter() - t0)
        out[name] = {"ours_s": float(np.median(ours)), "opencv_s": float(np.median(cv)),
                     "ratio": float(np.median(cv) / np.median(ours)), "boxes_ours": n_ours, "boxes_opencv": n_cv}
    return out


# ---- recall (definitions as the toolkit's detect.evaluation.recall) ---------------------------

def recall_metrics(per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """per_image: (proposals [R, 4], gt [G, 4], gt classes [G]) -> recall@0.5/0.7, MABO, boxes."""
    matched, best, classes = [], [], []
    for proposals, gt, cls in per_image:
        if len(gt) == 0:
            continue
        iou = box_iou(proposals, gt) if len(proposals) else np.zeros((0, len(gt)))
        best.append(iou.max(0) if len(iou) else np.zeros(len(gt)))
        matched.append(greedy_match(iou))
        classes.append(cls)
    m, b, c = np.concatenate(matched), np.concatenate(best), np.concatenate(classes)
    return {"recall@0.5": float((m >= 0.5).mean()), "recall@0.7": float((m >= 0.7).mean()),
            "MABO": float(np.mean([b[c == k].mean() for k in np.unique(c)])),
            "ABO": float(b.mean()), "gt_boxes": int(len(b)),
            "boxes_per_image": float(np.mean([len(p) for p, _, _ in per_image]))}


def toolkit_filter(boxes: np.ndarray, min_size: int = 20, top_k: int = 2000) -> np.ndarray:
    keep = (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)
    return boxes[keep][:top_k]


def recall_benchmark(data_dir: Path, max_images: int, mode: str = "fast") -> dict:
    coco = json.loads((data_dir / "val.json").read_text())
    gts: dict[int, list] = {}
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue  # the toolkit's "difficult": mostly occluded shapes
        x, y, w, h = ann["bbox"]
        gts.setdefault(ann["image_id"], []).append(([x, y, x + w, y + h], ann["category_id"]))
    rows = {"ours": [], "opencv": []}
    times = {"ours": [], "opencv": []}
    for i, info in enumerate(coco["images"][:max_images]):
        image = read_rgb(str(data_dir / info["file_name"]))
        small = resize_width(image)
        scale = np.array([image.shape[1] / small.shape[1], image.shape[0] / small.shape[0]] * 2)
        gt = gts.get(info["id"], [])
        gt_boxes = np.array([g for g, _ in gt], np.float64).reshape(-1, 4)
        gt_classes = np.array([c for _, c in gt], np.int64)
        for engine in (("ours", "opencv") if i % 2 == 0 else ("opencv", "ours")):
            t0 = time.perf_counter()
            if engine == "ours":
                boxes = selective_search_boxes(small, mode=mode)[0]
            else:
                boxes = opencv_selective_search(small, mode=mode)
            times[engine].append(time.perf_counter() - t0)
            rows[engine].append((boxes.astype(np.float64) * scale, gt_boxes, gt_classes))
    out = {"images": len(rows["ours"]), "mode": mode}
    for engine in rows:
        out[engine] = {"all": recall_metrics(rows[engine]),
                       "toolkit_min20_top2000": recall_metrics([(toolkit_filter(p), g, c) for p, g, c in rows[engine]]),
                       "median_s": float(np.median(times[engine]))}
    out["ratio_of_medians"] = out["opencv"]["median_s"] / out["ours"]["median_s"]
    return out


def fidelity(spec: str, limit: int) -> dict:
    """Boxes per image, recall@0.5 / 0.7 and MABO of the toolkit's ``selective_search`` (fast
    mode) on a COCO set. spec: ``JSON[:resize[:min_size]]`` (default 500 and 20, the paper's)."""
    json_path, *rest = spec.split(":")
    resize, min_size = (int(rest[0]) if rest else 500), (int(rest[1]) if len(rest) > 1 else 20)
    dataset = load_coco(json_path)
    records = dataset.records[:limit] if limit > 0 else dataset.records
    store = {r.image_id: selective_search(read_image(r.file_name), resize=resize, min_size=min_size)
             for r in records}
    subset = Dataset(dataset.name, records, dataset.class_names, dataset.category_ids)
    recall = proposal_recall(subset, _DictStore(store), top_ks=(300, 1000, 2000, 10 ** 9))
    return {"images": len(records), "resize": resize, "min_size": min_size,
            "boxes_per_image": float(np.mean([len(b) for b in store.values()])),
            **{f"{key}@{k if k < 10 ** 9 else 'all'}": recall[key][i] for i, k in enumerate(recall["top_k"])
               for key in ("recall@0.5", "recall@0.7", "MABO")}}


class _DictStore:
    """The ``get`` of a proposal store, over a dict image id -> boxes."""

    def __init__(self, boxes: dict):
        self.boxes = boxes

    def get(self, image_id: int) -> np.ndarray:
        return self.boxes[image_id]


def reference_boxes(images: dict) -> dict:
    """Our engine's boxes and ranking values on ``images`` in every mode, at threads 1 and 2."""
    out = {}
    for name, image in images.items():
        for mode in ("single", "fast", "quality"):
            for threads in (1, 2):
                boxes, scores = selective_search_boxes(image, mode=mode, threads=threads)
                out[f"{name}/{mode}/t{threads}/boxes"] = boxes
                out[f"{name}/{mode}/t{threads}/scores"] = scores
    return out


def check_reference(path: Path, images: dict) -> dict:
    """Write the reference boxes to ``path`` (npz) if it does not exist, else compare with it
    byte for byte; returns {"written": bool, "differ": [keys that differ]}."""
    current = reference_boxes(images)
    if not path.exists():
        with open(path, "wb") as f:
            np.savez(f, **current)
        return {"written": True, "differ": []}
    with np.load(path, allow_pickle=False) as saved:
        keys = sorted(set(saved.files) | set(current))
        differ = [k for k in keys if k not in saved.files or k not in current
                  or saved[k].dtype != current[k].dtype or saved[k].tobytes() != current[k].tobytes()]
    return {"written": False, "differ": differ}


def markdown(results: dict) -> str:
    lines = ["| image | size | ours s | OpenCV s | ratio | seg s | feat s | group s | boxes ours | boxes OpenCV |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["speed"]["images"].items():
        st = r["stages_s"]
        lines.append(f"| {name} | {r['size']} | {r['ours_s']:.3f} | {r['opencv_s']:.3f} | {r['ratio']:.1f}x | "
                     f"{st['segmentation']:.3f} | {st['features']:.3f} | {st['grouping']:.3f} | "
                     f"{r['boxes_ours']} | {r['boxes_opencv']} |")
    s = results["speed"]["summary"]
    lines.append(f"| **median of images** | | {s['ours_s']:.3f} | {s['opencv_s']:.3f} | **{s['ratio']:.1f}x** "
                 f"(per-image median {s['ratio_per_image_median']:.1f}x) | "
                 f"{s['stages_s']['segmentation']:.3f} | {s['stages_s']['features']:.3f} | "
                 f"{s['stages_s']['grouping']:.3f} | {s['boxes_ours']:.0f} | {s['boxes_opencv']:.0f} |")
    lines += ["", f"Compile: cold {results['compile']['cold_compile_s']:.1f} s, cached load "
              f"{results['compile']['cached_load_s']:.2f} s; in-process warm_up {results['compile']['in_process_s']:.2f} s", ""]
    lines += ["| image | threads=1 s | threads=2 s | threads=2 CPU s |", "|---|---|---|---|"]
    for name, r in results["latency"].items():
        lines.append(f"| {name} | {r['threads1_s']:.3f} | {r['threads2_s']:.3f} | {r['threads2_cpu_s']:.3f} |")
    if results.get("quality"):
        lines += ["", "Quality mode (80 hierarchies), interleaved:", "",
                  "| image | ours s | OpenCV s | ratio | boxes ours | boxes OpenCV |", "|---|---|---|---|---|---|"]
        for name, r in results["quality"].items():
            lines.append(f"| {name} | {r['ours_s']:.3f} | {r['opencv_s']:.3f} | {r['ratio']:.1f}x | "
                         f"{r['boxes_ours']} | {r['boxes_opencv']} |")
    for key in ("recall", "recall_quality"):
        rec = results.get(key)
        if not rec:
            continue
        lines += ["", f"Recall on the toolkit's synthetic val set ({rec['images']} images, 500 px wide, "
                  f"{rec['mode']} mode; median s/image ours {rec['ours']['median_s']:.3f}, "
                  f"OpenCV {rec['opencv']['median_s']:.3f}, ratio {rec['ratio_of_medians']:.1f}x)", "",
                  "| engine | boxes | recall@0.5 | recall@0.7 | MABO |", "|---|---|---|---|---|"]
        for engine in ("ours", "opencv"):
            for subset in ("all", "toolkit_min20_top2000"):
                m = rec[engine][subset]
                lines.append(f"| {engine} ({subset}) | {m['boxes_per_image']:.0f} | {m['recall@0.5']:.4f} | "
                             f"{m['recall@0.7']:.4f} | {m['MABO']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=["speed"],
                        help="parts to run: speed (against OpenCV, with recall on --data), fidelity "
                             "(--fidelity sets), reference (--reference)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--data", default="runs/ss_data", help="a `detect make-synthetic` folder (val.json)")
    parser.add_argument("--recall-images", type=int, default=40)
    parser.add_argument("--out", default="runs/bench_proposals.json")
    parser.add_argument("--quality-reps", type=int, default=1, help="0: skip the quality-mode timing")
    parser.add_argument("--quality-recall-images", type=int, default=20, help="0: skip quality-mode recall")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--fidelity", nargs="*", default=[], metavar="JSON[:RESIZE[:MIN_SIZE]]",
                        help="COCO sets for the fidelity part (fast mode; default resize 500, min size 20)")
    parser.add_argument("--fidelity-images", type=int, default=0, help="first N images of each set (0: all)")
    parser.add_argument("--reference", default="", help="npz of reference boxes: written if missing, else "
                                                        "compared byte for byte (exit status 1 if they differ)")
    parser.add_argument("--reference-images", nargs="*", default=[], help="more image files for --reference")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    numba.set_num_threads(1)
    results = {"versions": {"numpy": np.__version__, "numba": numba.__version__, "opencv": cv2.__version__,
                            "python": sys.version.split()[0]}}
    images = {}
    sample_dir = Path(cv2.__file__).parents[1] / "sklearn" / "datasets" / "images"
    for path in sorted(glob.glob(str(sample_dir / "*.jpg"))):
        images[Path(path).stem] = resize_width(read_rgb(path))
    for seed in range(3):
        images[f"synthetic{seed}"] = synthetic_photo(seed)
    if "reference" in args.only:
        if not args.reference:
            parser.error("--only reference needs --reference FILE")
        extra = {Path(p).name: read_rgb(p) for p in args.reference_images}
        results["reference"] = check_reference(Path(args.reference), {**images, **extra})
        print("reference", results["reference"], flush=True)
    if "fidelity" in args.only:
        results["fidelity"] = {spec: fidelity(spec, args.fidelity_images) for spec in args.fidelity}
        results["fidelity"]["photos_boxes_per_image"] = {  # fast mode at 500 px, all boxes
            name: len(selective_search(image)) for name, image in images.items()
            if not name.startswith("synthetic")}
        for spec, row in results["fidelity"].items():
            print(spec, json.dumps(row), flush=True)
    if "speed" in args.only:
        speed_part(args, images, results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    if "speed" in args.only:
        table = markdown(results)
        Path(args.out).with_suffix(".md").write_text(table + "\n")
        print(table)
    if results.get("reference", {}).get("differ"):
        sys.exit(f"boxes differ from {args.reference}: {results['reference']['differ'][:10]}")


def speed_part(args: argparse.Namespace, images: dict, results: dict) -> None:
    """Both engines interleaved per image (and the compile time, thread latency, quality mode,
    recall on the synthetic set) into ``results``."""
    results["compile"] = {} if args.skip_compile else compile_seconds()
    results["compile"].setdefault("cold_compile_s", float("nan"))
    results["compile"].setdefault("cached_load_s", float("nan"))
    results["compile"]["in_process_s"] = warm_up()
    opencv_selective_search(next(iter(images.values()))[:50, :50].copy())  # warm OpenCV too
    speed = {}
    for name, image in images.items():
        speed[name] = dict(time_pair(image, args.reps), size=f"{image.shape[1]}x{image.shape[0]}")
        print(name, speed[name], flush=True)
    med = lambda key: float(np.median([r[key] for r in speed.values()]))  # noqa: E731
    summary = {"ours_s": med("ours_s"), "opencv_s": med("opencv_s"), "boxes_ours": med("boxes_ours"),
               "boxes_opencv": med("boxes_opencv"),
               "stages_s": {s: float(np.median([r["stages_s"][s] for r in speed.values()])) for s in STAGES}}
    summary["ratio"] = summary["opencv_s"] / summary["ours_s"]
    summary["ratio_per_image_median"] = med("ratio")
    results["speed"] = {"images": speed, "summary": summary}
    results["latency"] = {name: time_threads(image, args.reps) for name, image in images.items()}
    if args.quality_reps > 0:
        results["quality"] = time_quality(images, args.quality_reps)
    data = Path(args.data)
    if (data / "val.json").exists():
        results["recall"] = recall_benchmark(data, args.recall_images)
        if args.quality_recall_images > 0:
            results["recall_quality"] = recall_benchmark(data, args.quality_recall_images, mode="quality")


if __name__ == "__main__":
    main()
