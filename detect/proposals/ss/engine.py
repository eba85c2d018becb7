"""Selective search [SS] (Uijlings et al., IJCV 2013): the pipeline of one image.

For each colour space of the mode: the graph and the per-pixel bins once; then for each k: FH
segmentation (min_size = k), region features, one grouping per strategy. The boxes of all
hierarchies are ranked as in the paper. The modes (``MODES``; the one table of them):

=============  ====================  =================  ======================  ===========
mode           colour spaces         k (= min_size)     strategies              hierarchies
=============  ====================  =================  ======================  ===========
``"single"``   HSV                   100                C+T+S+F                 1
``"fast"``     HSV, Lab              50, 100            C+T+S+F, T+S+F          8
``"quality"``  HSV, Lab, rgI, H, I   50, 100, 150, 300  C+T+S+F, T+S+F, F, S    80
=============  ====================  =================  ======================  ===========

Hierarchy index (seeds the ranking): ((k index) * n_colour_spaces + colour index) *
n_strategies + strategy index, as the original demo's loops. No resizing, no size filter here.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from detect.common.config import check_proposal_settings
from detect.proposals.ss.features import colour_space, pixel_bins, region_features
from detect.proposals.ss.grouping import STRATEGIES, hierarchical_grouping
from detect.proposals.ss.ranking import near_duplicates_last, rank_boxes
from detect.proposals.ss.segmentation import SIGMA, segment_graph, sorted_edges

MODES = {  # mode -> (colour spaces, ks, strategies)
    "single": (("hsv",), (100,), ("CTSF",)),
    "fast": (("hsv", "lab"), (50, 100), ("CTSF", "TSF")),
    "quality": (("hsv", "lab", "rgi", "h", "i"), (50, 100, 150, 300), ("CTSF", "TSF", "F", "S")),
}
STAGES = ("segmentation", "features", "grouping", "ranking")


def check_image(image: np.ndarray) -> None:
    """ValueError, saying how to fix it, unless ``image`` is a non-empty uint8 RGB array [H, W, 3]."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"selective search needs a numpy uint8 RGB image [H, W, 3], got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"selective search needs a uint8 RGB image [H, W, 3], got dtype {image.dtype} "
                         "(convert it first, e.g. scale uint16 to 0..255 and cast)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"selective search needs a uint8 RGB image [H, W, 3], got shape {list(image.shape)} "
                         "(replicate a grayscale image to 3 channels first)")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"selective search needs a non-empty image, got shape {list(image.shape)}")


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[stage] += time.perf_counter() - start


def _colour_space_hierarchies(image: np.ndarray, colour_index: int, mode: str,
                              k_scale: float = 1.0) -> tuple[dict, dict]:
    """All hierarchies of one colour space: ({hierarchy index: (boxes int32 [T, 4] inclusive,
    n_initial, include_initial)}, {stage: seconds})."""
    colour_spaces, ks, strategies = MODES[mode]
    height, width = image.shape[:2]
    seconds = dict.fromkeys(STAGES, 0.0)
    with _timed(seconds, "segmentation"):
        seg_image, feat_image = colour_space(image, colour_spaces[colour_index])
        order, sorted_weights = sorted_edges(seg_image, SIGMA)
    with _timed(seconds, "features"):
        colour_bins, texture_bins = pixel_bins(feat_image)
    out = {}
    for k_index, k in enumerate(ks):
        k = k * k_scale  # min size = k ([SS]), rounded to whole pixels
        with _timed(seconds, "segmentation"):
            labels, n_regions = segment_graph(order, sorted_weights, height, width, float(k), max(1, int(k + 0.5)))
        with _timed(seconds, "features"):
            sizes, boxes, colour_hist, texture_hist, pairs = region_features(
                labels, n_regions, colour_bins, texture_bins)
        for s_index, strategy in enumerate(strategies):
            index = (k_index * len(colour_spaces) + colour_index) * len(strategies) + s_index
            all_boxes = boxes  # a single region: its box
            if n_regions > 1:
                with _timed(seconds, "grouping"):
                    all_boxes = hierarchical_grouping(colour_hist, texture_hist, sizes, boxes, pairs,
                                                      height * width, *STRATEGIES[strategy])[0]
            out[index] = (all_boxes, n_regions, s_index == 0)
    return out, seconds


def selective_search_boxes(image: np.ndarray, *, mode: str = "fast", seed: int = 0,
                           threads: int = 1, timings: dict | None = None,
                           randomize: bool = True, k_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Selective-search boxes of uint8 RGB ``image`` [H, W, 3], best first: (boxes float32 [R, 4]
    xyxy, x2 / y2 exclusive; ranking values float32 [R], ascending), no duplicates. ``threads``:
    a pool over the colour spaces, same output. ``timings``: a dict that receives seconds per
    stage and "total". ``randomize=False``: random factor 1 (the whole image comes first)."""
    check_image(image)
    if image.shape[0] * image.shape[1] >= 2 ** 29:  # edge slots are int32 (4 per pixel)
        raise ValueError(f"selective search: image too large ({image.shape[0]} x {image.shape[1]}), resize it first")
    check_proposal_settings({"mode": mode, "seed": seed, "k_scale": k_scale}, "selective search")
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"selective search: threads must be an integer >= 1, got {threads!r}")
    start = time.perf_counter()
    image = np.ascontiguousarray(image)
    n_colours = len(MODES[mode][0])
    if threads == 1 or n_colours == 1:
        parts = [_colour_space_hierarchies(image, c, mode, k_scale) for c in range(n_colours)]
    else:
        with ThreadPoolExecutor(max_workers=min(int(threads), n_colours)) as pool:
            parts = list(pool.map(lambda c: _colour_space_hierarchies(image, c, mode, k_scale), range(n_colours)))
    hierarchies = {index: h for out, _ in parts for index, h in out.items()}
    seconds = {stage: sum(part_seconds[stage] for _, part_seconds in parts) for stage in STAGES}
    with _timed(seconds, "ranking"):
        boxes, values = rank_boxes([hierarchies[i] for i in sorted(hierarchies)], seed=int(seed),
                                   randomize=randomize)
        result = boxes.astype(np.float32)
        result[:, 2:] += 1.0  # inclusive -> exclusive
    if timings is not None:
        timings.update(seconds, total=time.perf_counter() - start)
    return result, values.astype(np.float32)


def warm_up() -> float:
    """Compile (or load from numba's cache) every kernel on a tiny image; returns the seconds."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), 4, 0), 4, 1)
    boxes, values = selective_search_boxes(image, mode="quality")
    near_duplicates_last(boxes.astype(np.float64), values, 0.7)
    return time.perf_counter() - start
