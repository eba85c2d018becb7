"""``detect tune-proposals``: the selective-search settings that fit a dataset.

As YOLOv5's autoanchor checks its anchors against the data, this runs selective search over a
grid of settings on a seeded sample of training images and measures, per setting, recall@0.5,
recall@0.7 and MABO (``detect.evaluation.recall``), boxes and seconds per image (one thread). A
setting is a *search* (one run per image: ``mode`` x ``resize`` x ``k_scale``) and what is done
to its boxes (cheap, on the cached search: ``min_size`` x ``ranking`` (with ``nms_iou``) x
``top_k``), each as ``detect.proposals.selective_search`` does it (``raw_proposals``, then
``finish_proposals``), so ``detect propose`` with the chosen block gives the measured boxes.

The choice (``choose``): among the settings whose recall at ``target_iou`` reaches
``target_recall`` with a ``top_k`` of at most ``max_boxes``, the one with the fewest search
seconds, then boxes, per image; if none does, the highest recall, and by how much it falls
short. Searches are tried cheapest first (``estimated_cost``), each on the first
``probe_images`` of the sample, then, unless its best recall there is more than
``PRUNE_MARGIN`` under the target, on all of it; the run stops at the first search that reaches
the target (``exhaustive``: every search). Each (search, image) result is cached in
``cache_dir``, one file written atomically, so a killed run redoes at most one image.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from detect import __version__
from detect.common.fileio import (atomic_path, start_or_resume, write_bytes_atomic, write_json_atomic,
                                  write_text_atomic)
from detect.data.images import read_image
from detect.evaluation.recall import counted_gt, data_arguments, match_at_top_ks, recall_summary
from detect.proposals.selective_search import finish_proposals, raw_proposals, resized_shape
from detect.proposals.ss import MODES as OUR_MODES, warm_up
from detect.proposals.store import dataset_fingerprint

MODES = tuple(OUR_MODES)  # every mode of selective search
RESIZES = (0, 500, 800, 1000)  # 0: native size
K_SCALES = (1.0, 0.5, 0.25)
MIN_SIZES = (5, 10, 20)  # box sides, pixels of the resized image ([RCNN]: 20)
# The "nms" ranking's IoUs tried. Not 0.5: within a budget it keeps recall@0.5 but loses
# recall@0.7 (nuclei, 100 boxes: 0.49 against 0.69 at 0.7), and the cheapest rule would pick it.
NMS_IOUS = (0.7, 0.9)


def rankings(nms_ious=NMS_IOUS) -> tuple:
    """(ranking, nms_iou) pairs: the paper's, then nms at each IoU."""
    return (("paper", 0.7), *(("nms", float(iou)) for iou in nms_ious))


RANKINGS = rankings()
BUDGETS = (100, 300, 500, 1000, 2000)  # top_k tried (and 0: all boxes, shown, never chosen)
PRUNE_MARGIN = 0.1


@dataclass(frozen=True)
class Search:
    mode: str
    resize: int
    k_scale: float

    @property
    def key(self) -> str:
        return f"{self.mode}_r{self.resize}_k{self.k_scale:g}"


@dataclass
class Grid:
    """What is tried (defaults above)."""

    modes: tuple = MODES
    resizes: tuple = RESIZES
    k_scales: tuple = K_SCALES
    min_sizes: tuple = MIN_SIZES
    rankings: tuple = RANKINGS
    budgets: tuple = BUDGETS


def sample_records(records: list, num_images: int, seed: int) -> list:
    """Up to ``num_images`` records with counted ground truth, drawn with ``seed``, in dataset order."""
    with_gt = [r for r in records if len(counted_gt(r)[0])]
    if not with_gt:
        raise ValueError("tune-proposals: no image of the dataset has a ground-truth box to measure recall on")
    if len(with_gt) <= num_images:
        return with_gt
    chosen = np.random.default_rng(seed).choice(len(with_gt), num_images, replace=False)
    return [with_gt[i] for i in sorted(chosen)]


class SearchCache:
    """(search, image) -> (the ``raw_proposals`` tuple, its seconds), computed once, kept on disk."""

    def __init__(self, cache_dir: str | Path, base: dict, records: list):
        self.dir = Path(cache_dir)
        job = {"engine": base["engine"], "resize_side": base["resize_side"], "seed": base["seed"],
               "code_version": __version__,
               "images": dataset_fingerprint([(r.image_id, r.file_name) for r in records])}
        start_or_resume(self.dir / "job.json", job, hint=f"delete {self.dir} to start over, or re-run "
                        "with the same data, sample and settings")
        self.base = base

    def get(self, search: Search, record) -> tuple[tuple, float]:
        path = self.dir / search.key / f"{record.image_id}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return (z["boxes"], z["scores"], tuple(int(v) for v in z["shape"])), float(z["seconds"])
        image = read_image(record.file_name)
        t0 = time.perf_counter()
        raw = raw_proposals(image, engine=self.base["engine"], mode=search.mode, resize=search.resize,
                            resize_side=self.base["resize_side"], seed=self.base["seed"], k_scale=search.k_scale)
        seconds = time.perf_counter() - t0
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, boxes=raw[0], scores=raw[1], shape=np.array(raw[2], np.int64), seconds=seconds)
        return raw, seconds


def evaluate_search(search: Search, records: list, cache: SearchCache, grid: Grid, target_iou: float,
                    progress: bool = True, desc: str = "") -> tuple[list[dict], float]:
    """Every (min_size, ranking, top_k) of ``search`` on ``records`` -> (rows, search s / image); a
    row: the setting, boxes_per_image, ``recall_summary``, recall@target_iou, seconds_per_image."""
    budgets = sorted(set(grid.budgets)) + [0]
    variants = [(m, r, i) for m in grid.min_sizes for r, i in grid.rankings]
    matches = {(v, k): [] for v in variants for k in budgets}  # per image: (matched IoU [G], best IoU [G])
    num_boxes = {(v, k): [] for v in variants for k in budgets}  # per image
    filter_seconds = {v: [] for v in variants}  # per image
    classes, search_seconds = [], []
    for record in tqdm(records, desc=desc or search.key, unit="img", leave=False, disable=not progress):
        raw, seconds = cache.get(search, record)
        search_seconds.append(seconds)
        gt_boxes, gt_classes = counted_gt(record)
        classes.append(gt_classes)
        for v in variants:  # (min_size, ranking, nms_iou)
            t0 = time.perf_counter()
            boxes, _ = finish_proposals(raw, min_size=v[0], ranking=v[1], nms_iou=v[2])
            filter_seconds[v].append(time.perf_counter() - t0)
            for k, match in match_at_top_ks(boxes, gt_boxes, budgets).items():
                matches[v, k].append(match)
                num_boxes[v, k].append(min(k, len(boxes)) if k > 0 else len(boxes))
    classes = np.concatenate(classes)
    search_s = float(np.mean(search_seconds))
    rows = [{**asdict(search), "min_size": v[0], "ranking": v[1], "nms_iou": v[2], "top_k": k,
             "boxes_per_image": float(np.mean(num_boxes[v, k])), **recall_summary(match, classes),
             f"recall@{target_iou:g}": float((np.concatenate([m for m, _ in match]) >= target_iou).mean()),
             "search_seconds_per_image": search_s,
             "seconds_per_image": search_s + float(np.mean(filter_seconds[v]))} for (v, k), match in matches.items()]
    return rows, search_s


def estimated_cost(search: Search, records: list, resize_side: str) -> float:
    """A rough a-priori cost of ``search``, to order the searches: resized pixels x colour spaces x
    ks x (1 + strategies / 4), more for a smaller k (more regions to group)."""
    colour_spaces, ks, strategies = OUR_MODES[search.mode]
    pixels = np.mean([math.prod(resized_shape(r.height, r.width, search.resize, resize_side)) for r in records])
    return float(pixels * len(colour_spaces) * len(ks) * (1 + len(strategies) / 4) / math.sqrt(search.k_scale))


def eligible(row: dict, max_boxes: int) -> bool:
    return 0 < row["top_k"] <= max_boxes


def cost(row: dict) -> tuple[float, float]:
    """Cheaper first: the search's seconds per image (its filter costs ms), then boxes per image."""
    return row["search_seconds_per_image"], row["boxes_per_image"]


def choose(rows: list[dict], metric: str, target: float) -> dict:
    """The rule of the module docstring: the cheapest of ``rows`` whose ``metric`` reaches
    ``target``, else the cheapest of those with the highest ``metric``."""
    top = max(r[metric] for r in rows)
    return min((r for r in rows if r[metric] >= min(target, top)), key=cost)


def tune(records: list, *, base: dict, cache_dir: str | Path, grid: Grid | None = None, num_images: int = 50,
         seed: int = 0, target_recall: float = 0.9, target_iou: float = 0.5, max_boxes: int = 2000,
         probe_images: int = 5, exhaustive: bool = False, progress: bool = True) -> dict:
    """Tune the proposal settings on ``records`` (``ImageRecord``s of a training split).

    base: the other ``ProposalConfig`` fields as a dict (engine, resize_side, seed are used as
    they are). Returns {"rows": every fully measured setting, "probe": {search key: {seconds,
    best recall}}, "status": {search key: "measured", "pruned" or "not run"}, "chosen": a row,
    "reached", "shortfall": target - chosen recall, "settings": the ``proposals:`` values, ...}.
    """
    grid = grid or Grid()
    if not 0.5 <= target_iou <= 0.95:
        raise ValueError(f"tune-proposals: target IoU must be in [0.5, 0.95], got {target_iou}")
    if not 0 < target_recall <= 1:
        raise ValueError(f"tune-proposals: target recall must be in (0, 1], got {target_recall}")
    if max_boxes < 1 or num_images < 1 or probe_images < 1:
        raise ValueError("tune-proposals: max boxes, number of images and probe images must be >= 1")
    grid = replace(grid, budgets=tuple(sorted({b for b in grid.budgets if b <= max_boxes} | {max_boxes})))
    sample = sample_records(records, num_images, seed)
    cache = SearchCache(cache_dir, base, sample)
    if base["engine"] == "ours":
        warm_up()  # numba's compile or cache load must not count as the first search's time
    metric = f"recall@{target_iou:g}"

    def best_recall(rows: list[dict]) -> float:
        return max(r[metric] for r in rows if eligible(r, max_boxes))

    probe_set = sample[:probe_images]
    probe, status, all_rows = {}, {}, []
    searches = [Search(m, int(r), float(k)) for m in grid.modes for r in grid.resizes for k in grid.k_scales]
    order = sorted(searches, key=lambda s: estimated_cost(s, sample, base["resize_side"]))
    for i, search in enumerate(order):
        rows, seconds = evaluate_search(search, probe_set, cache, grid, target_iou, progress,
                                        desc=f"{i + 1}/{len(order)} {search.key} (probe)")
        probe[search.key] = {"seconds_per_image": seconds, "best_recall": best_recall(rows)}
        if not exhaustive and probe[search.key]["best_recall"] < target_recall - PRUNE_MARGIN:
            status[search.key] = "pruned"
            continue
        rows, _ = evaluate_search(search, sample, cache, grid, target_iou, progress,
                                  desc=f"{i + 1}/{len(order)} {search.key}")
        all_rows += rows
        status[search.key] = "measured"
        if not exhaustive and best_recall(rows) >= target_recall:
            break
    if not all_rows:  # every search pruned: measure the one that did best on the probe images
        search = next(s for s in order if s.key == max(probe, key=lambda k: probe[k]["best_recall"]))
        all_rows, _ = evaluate_search(search, sample, cache, grid, target_iou, progress, desc=search.key)
        status[search.key] = "measured"
    chosen = choose([r for r in all_rows if eligible(r, max_boxes)], metric, target_recall)
    settings = {**base, **{k: chosen[k] for k in ("mode", "resize", "min_size", "top_k", "ranking", "k_scale")}}
    if chosen["ranking"] == "nms":
        settings["nms_iou"] = chosen["nms_iou"]
    status.update({s.key: "not run" for s in order if s.key not in status})
    return {"rows": all_rows, "probe": probe, "status": status, "chosen": chosen, "settings": settings,
            "reached": chosen[metric] >= target_recall, "shortfall": target_recall - chosen[metric], "metric": metric,
            "target": {"recall": target_recall, "iou": target_iou, "max_boxes": max_boxes},
            "images": len(records), "sample": len(sample), "seed": seed, "probe_images": len(probe_set),
            "grid": asdict(grid), "exhaustive": exhaustive}


def ranking_name(row: dict) -> str:
    return "paper" if row["ranking"] == "paper" else f"nms {row['nms_iou']:g}"


def summary_line(result: dict) -> str:
    """One sentence: the target, reached or by how much it falls short, and the chosen setting."""
    c, t, metric = result["chosen"], result["target"], result["metric"]
    what = (f"{c['mode']} mode, resize {c['resize'] or 'native'}, k_scale {c['k_scale']:g}, min_size "
            f"{c['min_size']}, ranking {ranking_name(c)}, top_k {c['top_k']}: {metric} {c[metric]:.3f}, "
            f"recall@0.7 {c['recall@0.7']:.3f}, MABO {c['MABO']:.3f}, {c['boxes_per_image']:.0f} boxes and "
            f"{c['seconds_per_image']:.2f} s per image")
    goal = f"{metric} >= {t['recall']:g} within {t['max_boxes']} boxes per image"
    if result["reached"]:
        return f"target {goal} reached by the cheapest setting: {what}"
    return (f"target {goal} NOT reached: the best setting falls short by {result['shortfall']:.3f} ({what}); "
            f"selective search does not separate enough of these objects at any setting tried")


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def proposals_yaml(result: dict, command: str) -> str:
    """The ``proposals:`` block to merge into a config, each value commented with its source
    (the values the grid tried, or "as given")."""
    grid = result["grid"]

    def tried(values) -> str:
        return "tuned: " + ", ".join(_text(v) for v in dict.fromkeys(values))
    sources = {"mode": tried(grid["modes"]), "resize": tried(grid["resizes"]) + " (0: native)",
               "k_scale": tried(grid["k_scales"]) + " (times the paper's k)", "min_size": tried(grid["min_sizes"]),
               "top_k": "tuned: the smallest budget that does it", "ranking": tried(r for r, _ in grid["rankings"]),
               "nms_iou": tried(i for r, i in grid["rankings"] if r == "nms") + " (used by ranking nms only)"}
    lines = [f"# {command}", f"# {result['sample']} of {result['images']} training images (seed {result['seed']}), "
             f"one thread. {summary_line(result)}.", "proposals:"]
    for key, value in result["settings"].items():
        source = sources.get(key, "as given")
        if key == "nms_iou" and result["settings"]["ranking"] != "nms":
            source = "as given (unused with ranking paper)"
        lines.append(f"  {key + ':':<13} {_text(value):<8} # {source}")
    return "\n".join(lines) + "\n"


def best_per_search(result: dict) -> list[dict]:
    """For each fully measured search, its setting by ``choose``, best search first."""
    metric, target = result["metric"], result["target"]["recall"]
    per_search: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        if eligible(r, result["target"]["max_boxes"]):
            per_search.setdefault((r["mode"], r["resize"], r["k_scale"]), []).append(r)
    best = [choose(rows, metric, target) for rows in per_search.values()]
    return sorted(best, key=lambda r: (-min(r[metric], target), cost(r)))


def format_table(result: dict) -> str:
    """Markdown: one row per search (its best setting), then the probe-only searches."""
    metric = result["metric"]
    keys = ["recall@0.5", "recall@0.7"] + ([metric] if metric not in ("recall@0.5", "recall@0.7") else [])
    head = ["mode", "resize", "k_scale", "min_size", "ranking", "top_k", "boxes / image", *keys, "MABO",
            "s / image", ""]
    lines = _markdown(head, [[r["mode"], str(r["resize"] or "native"), f"{r['k_scale']:g}", str(r["min_size"]),
                              ranking_name(r), str(r["top_k"]), f"{r['boxes_per_image']:.0f}",
                              *(f"{r[k]:.3f}" for k in keys), f"{r['MABO']:.3f}", f"{r['seconds_per_image']:.3f}",
                              "**chosen**" if r == result["chosen"] else ""] for r in best_per_search(result)])
    pruned = [k for k, v in result["status"].items() if v == "pruned"]
    if pruned:
        lines += ["", f"Pruned after the {result['probe_images']} probe images (best recall@"
                  f"{result['target']['iou']:g} there more than {PRUNE_MARGIN:g} under the target; seconds per image): "
                  + ", ".join(f"{k} ({result['probe'][k]['best_recall']:.2f}, "
                              f"{result['probe'][k]['seconds_per_image']:.2f} s)" for k in pruned) + "."]
    not_run = [k for k, v in result["status"].items() if v == "not run"]
    if not_run:
        lines += ["", "Not run (a cheaper search reached the target; `--exhaustive` runs them): "
                  + ", ".join(not_run) + "."]
    return "\n".join(lines)


def budget_table(result: dict) -> str:
    """Markdown: the chosen search's recall@0.5 / recall@0.7 at every budget, one row per ranking
    (at the chosen min_size)."""
    c = result["chosen"]
    rows = [r for r in result["rows"] if (r["mode"], r["resize"], r["k_scale"], r["min_size"])
            == (c["mode"], c["resize"], c["k_scale"], c["min_size"])]
    budgets = sorted({r["top_k"] for r in rows}, key=lambda k: k or math.inf)
    table = []
    for ranking, nms_iou in dict.fromkeys((r["ranking"], r["nms_iou"]) for r in rows):
        cells = {r["top_k"]: r for r in rows if (r["ranking"], r["nms_iou"]) == (ranking, nms_iou)}
        table.append([ranking_name(cells[budgets[0]]),
                      *(f"{cells[k]['recall@0.5']:.3f} / {cells[k]['recall@0.7']:.3f}" for k in budgets)])
    return "\n".join(_markdown(["ranking", *(str(k or "all") for k in budgets)], table))


def _markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def tune_to_files(records: list, out: str | Path, *, data_spec: dict, figure, cache_dir: str = "", **options) -> dict:
    """``tune`` (``options``: its keyword arguments; searches cached in ``cache_dir``, default
    ``<out>.cache``), then write ``out`` (the ``proposals:`` block) and beside it ``.md`` (the tables),
    ``.png`` (``figure(result)``) and ``.json``, print the table and the verdict; returns the result."""
    out = Path(out)
    result = tune(records, cache_dir=cache_dir or f"{out}.cache", **options)
    target = result["target"]
    command = (f"detect tune-proposals --data {data_arguments(data_spec)} --num-images "
               f"{options.get('num_images', 50)} --seed {result['seed']} --target-recall {target['recall']:g} "
               f"--target-iou {target['iou']:g} --max-boxes {target['max_boxes']} ({time.strftime('%Y-%m-%d')})")
    summary = summary_line(result)
    write_text_atomic(out, proposals_yaml(result, command))
    write_text_atomic(out.with_suffix(".md"), f"{command}\n\n{summary}\n\nBest setting of each search measured on "
                      f"the {result['sample']} images:\n\n{format_table(result)}\n\nThe chosen search's recall@0.5 / "
                      f"recall@0.7 at each budget (top_k), per ranking:\n\n{budget_table(result)}\n")
    write_bytes_atomic(out.with_suffix(".png"), figure(result))
    write_json_atomic(out.with_suffix(".json"), result)
    print(format_table(result))
    print(summary)
    print(f"wrote {out} (merge its proposals: block into your config), {out.with_suffix('.md')}, "
          f"{out.with_suffix('.png')} and {out.with_suffix('.json')}")
    return result
