"""Segmentation == a slow, obvious pure-Python Felzenszwalb-Huttenlocher, label for label."""

import math

import numpy as np
import pytest
from scipy.ndimage import correlate1d

from conftest import blocky_image, segment
from detect.proposals.ss import segmentation as seg


# ---- the reference: plain Python loops, float32 arithmetic as in the original C++ ----------

def ref_mask(sigma):
    length = int(math.ceil(sigma * 4.0)) + 1
    mask = [np.float32(math.exp(-0.5 * (i / sigma) * (i / sigma))) for i in range(length)]
    total = np.float32(0.0)
    for i in range(1, length):
        total = np.float32(total + mask[i])
    total = np.float32(np.float32(2.0) * total + mask[0])
    return [np.float32(m / total) for m in mask]


def ref_smooth_1d(values, mask):
    n = len(values)
    out = []
    for i in range(n):
        acc = np.float32(mask[0] * values[i])
        for j in range(1, len(mask)):
            left = values[max(i - j, 0)]
            right = values[min(i + j, n - 1)]
            acc = np.float32(acc + np.float32(mask[j] * np.float32(left + right)))
        out.append(acc)
    return out


def ref_smooth(image, sigma=0.8):
    height, width, channels = image.shape
    mask = ref_mask(sigma)
    out = np.zeros(image.shape, np.float32)
    for c in range(channels):
        rows = [ref_smooth_1d([np.float32(v) for v in image[y, :, c]], mask) for y in range(height)]
        for x in range(width):
            column = ref_smooth_1d([rows[y][x] for y in range(height)], mask)
            for y in range(height):
                out[y, x, c] = column[y]
    return out


def ref_segment(image, k, min_size, sigma=0.8):
    height, width, _ = image.shape
    smoothed = ref_smooth(image, sigma)
    edges = []  # (weight, a, b) in the original generation order
    for y in range(height):
        for x in range(width):
            for dx, dy in ((1, 0), (0, 1), (1, 1), (1, -1)):
                x2, y2 = x + dx, y + dy
                if x2 < width and 0 <= y2 < height:
                    total = np.float32(0.0)
                    for c in range(image.shape[2]):
                        d = np.float32(smoothed[y, x, c] - smoothed[y2, x2, c])
                        total = np.float32(total + np.float32(d * d))
                    edges.append((np.float32(math.sqrt(total)), y * width + x, y2 * width + x2))
    edges.sort(key=lambda e: e[0])  # stable
    return ref_segment_edges(height * width, edges, k, min_size).reshape(height, width)


def same_partition(a, b):
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


# ---- tests ---------------------------------------------------------------------------------

def test_mask_and_smoothing_match_a_plain_convolution():
    rng = np.random.default_rng(1)
    image = blocky_image(rng, 12, 15)
    half = seg.gaussian_mask(0.8).astype(np.float64)
    assert abs(half[0] + 2 * half[1:].sum() - 1) < 1e-6 and len(half) == 5
    kernel = np.concatenate([half[:0:-1], half])
    expected = correlate1d(correlate1d(image.astype(np.float64), kernel, axis=1, mode="nearest"),
                           kernel, axis=0, mode="nearest")
    np.testing.assert_allclose(seg.smooth(image, 0.8), expected, atol=1e-3)


def test_radix_argsort_is_a_stable_argsort():
    rng = np.random.default_rng(2)
    values = rng.integers(0, 50, 5000).astype(np.float32) * np.float32(0.37)  # many ties
    values[::7] = np.inf
    values[::11] = 0.0
    np.testing.assert_array_equal(seg.radix_sort(values)[0],
                                  np.argsort(values, kind="stable"))
    values = rng.random(3000).astype(np.float32) * 500
    before = values.copy()
    order, sorted_values = seg.radix_sort(values)
    np.testing.assert_array_equal(order, np.argsort(values, kind="stable"))
    np.testing.assert_array_equal(sorted_values, values[order])
    np.testing.assert_array_equal(values, before)  # the input is not written


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segmentation_equals_reference(seed):
    rng = np.random.default_rng(seed)
    image = blocky_image(rng, 12, 15)
    edges = seg.sorted_edges(image)  # sorted once, reused for every k
    n_checked = 0
    for k, min_size in ((5, 1), (20, 5), (50, 50), (100, 100), (300, 10)):
        labels, n = segment(image, k, min_size, edges=edges)
        assert labels.dtype == np.int32 and labels.shape == (12, 15)
        assert sorted(np.unique(labels)) == list(range(n))
        # labels numbered in row-major order of first appearance
        _, first = np.unique(labels.ravel(), return_index=True)
        assert (np.diff(first) > 0).all()
        expected = ref_segment(image, k, min_size)
        assert same_partition(labels, expected), (k, min_size)
        n_checked += n > 1
    assert n_checked >= 2  # the test saw real partitions, not just one region


def test_segmentation_reference_can_disagree():
    """The comparison is not vacuous: a different k gives a different partition."""
    image = blocky_image(np.random.default_rng(0), 12, 15)
    labels, _ = segment(image, 5, 1)
    assert not same_partition(labels, ref_segment(image, 300, 10))


def test_min_size_is_enforced():
    image = blocky_image(np.random.default_rng(3), 30, 40, noise=60)
    labels, n = segment(image, 50)
    assert np.bincount(labels.ravel()).min() >= 50 or n == 1


def ref_segment_edges(n_pixels, edges, k, min_size):
    """FH on an explicit, already ordered edge list [(w, a, b)] (float32 weights)."""
    parent = list(range(n_pixels))
    size = [1] * n_pixels
    threshold = [np.float32(k)] * n_pixels

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for w, a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb and w <= threshold[ra] and w <= threshold[rb]:
            parent[rb] = ra
            size[ra] += size[rb]
            threshold[ra] = np.float32(w + np.float32(np.float32(k) / np.float32(size[ra])))
    for w, a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb and (size[ra] < min_size or size[rb] < min_size):
            parent[rb] = ra
            size[ra] += size[rb]
    return np.array([find(p) for p in range(n_pixels)])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_graph_part_with_ties_and_exact_thresholds(seed):
    """Integer weights: many ties and weights exactly equal to thresholds (w <= Int + k/|C|)."""
    rng = np.random.default_rng(seed)
    height, width = 10, 12
    weights = rng.integers(0, 9, 4 * height * width).astype(np.float32)
    for y in range(height):  # slots pointing outside the image
        for x in range(width):
            slot = 4 * (y * width + x)
            if x == width - 1:
                weights[[slot, slot + 2, slot + 3]] = np.inf
            if y == height - 1:
                weights[[slot + 1, slot + 2]] = np.inf
            if y == 0:
                weights[slot + 3] = np.inf
    order = seg.radix_sort(weights)[0]
    n_edges = int(np.isfinite(weights).sum())
    order = order[:n_edges]
    offsets = [1, width, width + 1, 1 - width]
    edges = [(weights[s], s // 4, s // 4 + offsets[s % 4]) for s in order.tolist()]
    for k, min_size in ((2, 1), (6, 1), (6, 4), (12, 3)):
        labels, n = seg.segment_graph(order, weights[order], height, width, float(k), min_size)
        assert same_partition(labels, ref_segment_edges(height * width, edges, k, min_size).reshape(height, width))
