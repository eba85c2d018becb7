"""Felzenszwalb-Huttenlocher graph segmentation [FH04], as used by selective search [SS].

Faithful to the original ``segment-image`` code (and Uijlings' ``mexFelzenSegmentIndex``):
each channel smoothed with a Gaussian (sigma 0.8, replicated borders, x then y, float32); an
8-connected grid graph, for each pixel in row-major order the edges to (x+1, y), (x, y+1),
(x+1, y+1), (x+1, y-1), weighing the Euclidean distance of the smoothed colours; edges visited
by weight, components A, B joined when w <= Int(A) + k/|A| and w <= Int(B) + k/|B|; then every
edge, in the same order, joins its two components if either is smaller than ``min_size``.

The edges are built and stably sorted ONCE per colour space (``sorted_edges``), reused for every
k (``segment_graph``). An edge is its *slot* ``4 * p + d`` (p = y * W + x, d = direction 0..3 as
listed above); slots pointing outside the image weigh +inf and are never used.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

SIGMA = 0.8  # [SS]: sigma of the pre-smoothing
_JIT = dict(cache=True, nogil=True)


@njit(**_JIT)
def gaussian_mask(sigma: float) -> np.ndarray:
    """Half Gaussian mask (float32 [len], len = ceil(4 sigma) + 1), normalised as in FH's
    ``filter.h``: mask[0] + 2 * sum(mask[1:]) == 1."""
    sigma = max(sigma, 0.01)
    length = int(math.ceil(sigma * 4.0)) + 1
    mask = np.empty(length, np.float32)
    for i in range(length):
        mask[i] = np.float32(math.exp(-0.5 * (i / sigma) * (i / sigma)))
    total = np.float32(0.0)
    for i in range(1, length):
        total += abs(mask[i])
    total = np.float32(2.0) * total + abs(mask[0])
    for i in range(length):
        mask[i] = mask[i] / total
    return mask


@njit(**_JIT)
def smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """The smoothing of the module docstring: uint8 [H, W, C] -> float32 [H, W, C]; each output
    is mask[0] * v[i] + sum_j mask[j] * (v[i - j] + v[i + j]), accumulated in float32 in that
    order, as FH's ``convolve_even``."""
    height, width, channels = image.shape
    mask = gaussian_mask(sigma)
    radius = mask.size - 1
    row_len = width * channels
    src = image.reshape(height, row_len)
    padded = np.empty((width + 2 * radius) * channels, np.float32)
    tmp = np.empty((height, row_len), np.float32)
    for y in range(height):
        for x in range(width + 2 * radius):
            xx = min(max(x - radius, 0), width - 1)
            for c in range(channels):
                padded[x * channels + c] = np.float32(src[y, xx * channels + c])
        centre = radius * channels
        for i in range(row_len):
            tmp[y, i] = mask[0] * padded[centre + i]
        for j in range(1, radius + 1):
            shift = j * channels
            for i in range(row_len):
                tmp[y, i] += mask[j] * (padded[centre + i - shift] + padded[centre + i + shift])
    out = np.empty((height, row_len), np.float32)
    for y in range(height):
        for i in range(row_len):
            out[y, i] = mask[0] * tmp[y, i]
        for j in range(1, radius + 1):
            up = max(y - j, 0)
            down = min(y + j, height - 1)
            for i in range(row_len):
                out[y, i] += mask[j] * (tmp[up, i] + tmp[down, i])
    return out.reshape(height, width, channels)


@njit(**_JIT)
def edge_weights(smoothed: np.ndarray) -> np.ndarray:
    """Weights of the 8-connected grid graph, one per edge slot (module docstring): float32
    [H, W, C] -> float32 [4 * H * W]."""
    height, width, channels = smoothed.shape
    weights = np.full(4 * height * width, np.inf, np.float32)
    dys = (0, 1, 1, -1)
    dxs = (1, 0, 1, 1)
    for y in range(height):
        for x in range(width):
            slot = 4 * (y * width + x)
            for d in range(4):
                y2 = y + dys[d]
                x2 = x + dxs[d]
                if x2 < width and 0 <= y2 < height:
                    total = np.float32(0.0)
                    for c in range(channels):
                        diff = smoothed[y, x, c] - smoothed[y2, x2, c]
                        total += diff * diff
                    weights[slot + d] = np.float32(math.sqrt(total))
    return weights


@njit(**_JIT)
def radix_sort(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order int32 [N], values[order] float32 [N]) for non-negative float32 ``values`` (+inf
    allowed): a stable LSD radix sort on the IEEE bits, two 16-bit passes (one skipped when its
    digit is the same for every value)."""
    n = values.size
    keys = values.view(np.uint32)
    counts = np.zeros((2, 65536), np.int64)
    for i in range(n):
        key = keys[i]
        counts[0, key & np.uint32(0xFFFF)] += 1
        counts[1, key >> np.uint32(16)] += 1
    order = np.arange(n).astype(np.int32)
    spare = np.empty(n, np.int32)
    buffers = (np.empty(n, np.uint32), np.empty(n, np.uint32))
    offsets = np.empty(65536, np.int64)
    moved = False
    for d in range(2):
        if counts[d].max() == n:
            continue
        moved = True
        start = 0
        for b in range(65536):
            offsets[b] = start
            start += counts[d, b]
        shift = np.uint32(16 * d)
        out_keys = buffers[d]
        for i in range(n):
            key = keys[i]
            b = (key >> shift) & np.uint32(0xFFFF)
            position = offsets[b]
            spare[position] = order[i]
            out_keys[position] = key
            offsets[b] = position + 1
        order, spare = spare, order
        keys = out_keys
    return order, (keys.view(np.float32) if moved else values.copy())


def sorted_edges(seg_image: np.ndarray, sigma: float = SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """Smooth, build and sort the graph of one colour space image (uint8 [H, W, C]): (edge slots
    int32 [E] by weight, ties in slot order; their weights float32 [E])."""
    height, width = seg_image.shape[:2]
    weights = edge_weights(smooth(np.ascontiguousarray(seg_image), float(sigma)))
    order, sorted_weights = radix_sort(weights)
    n_edges = (width - 1) * height + width * (height - 1) + 2 * (width - 1) * (height - 1)
    return order[:n_edges], sorted_weights[:n_edges]


# Union-find: ``parent`` int32 [N] (path compression), and ``info`` int32 [2N] holding, for a
# root r, its size at 2r and the float32 bits of its threshold Int(C) + k / |C| at 2r + 1.


@njit(inline="always", **_JIT)
def _find(parent: np.ndarray, x: int) -> int:
    up = parent[x]
    if parent[up] == up:
        return up  # x is a root or a child of one: ~90% of the finds, one predictable branch
    root = up
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:  # path compression
        nxt = parent[x]
        parent[x] = root
        x = nxt
    return root


@njit(inline="always", **_JIT)
def _join(parent: np.ndarray, info: np.ndarray, a: int, b: int) -> int:
    """Join roots a and b (the smaller set under the larger); returns the new root."""
    if info[2 * a] < info[2 * b]:
        a, b = b, a
    parent[b] = a
    info[2 * a] += info[2 * b]
    return a


@njit(**_JIT)
def segment_graph(order: np.ndarray, sorted_weights: np.ndarray, height: int, width: int,
                  k: float, min_size: int) -> tuple[np.ndarray, int]:
    """FH on ``sorted_edges``' output -> (labels int32 [H, W] numbered 0..n-1 in row-major order
    of first appearance, n)."""
    n_pixels = height * width
    parent = np.arange(n_pixels).astype(np.int32)
    info = np.empty(2 * n_pixels, np.int32)
    threshold = info.view(np.float32)
    c = np.float32(k)
    for p in range(n_pixels):
        info[2 * p] = 1
        threshold[2 * p + 1] = c  # Int(C) + k / |C| with Int = 0, |C| = 1
    offsets = np.array([1, width, width + 1, 1 - width], np.int64)
    for e in range(order.size):
        slot = order[e]
        a = slot >> 2
        ra = _find(parent, a)
        rb = _find(parent, a + offsets[slot & 3])
        if ra != rb:
            w = sorted_weights[e]
            if w <= threshold[2 * ra + 1] and w <= threshold[2 * rb + 1]:
                root = _join(parent, info, ra, rb)
                threshold[2 * root + 1] = w + c / np.float32(info[2 * root])
    # Post-process small components. An edge between two pixels whose components already
    # have min_size pixels can never join anything (components only grow): skip it cheaply.
    small = np.zeros(n_pixels, np.bool_)
    for p in range(n_pixels):
        small[p] = info[2 * _find(parent, p)] < min_size
    for e in range(order.size):
        slot = order[e]
        a = slot >> 2
        b = a + offsets[slot & 3]
        if not (small[a] or small[b]):
            continue
        ra = _find(parent, a)
        rb = _find(parent, b)
        if ra != rb and (info[2 * ra] < min_size or info[2 * rb] < min_size):
            _join(parent, info, ra, rb)
    labels = np.empty(n_pixels, np.int32)
    mapped = np.full(n_pixels, -1, np.int32)
    n_labels = 0
    for p in range(n_pixels):
        root = _find(parent, p)
        if mapped[root] < 0:
            mapped[root] = n_labels
            n_labels += 1
        labels[p] = mapped[root]
    return labels.reshape(height, width), n_labels
