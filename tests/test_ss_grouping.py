"""Hierarchical grouping: merge count, box/size/histogram bookkeeping, greedy choice."""

import numpy as np
import pytest

from detect.proposals.ss import features as feat
from detect.proposals.ss import grouping
from conftest import blocky_image, segment


def setup_case(seed, height=36, width=48, k=30, space="hsv"):
    rng = np.random.default_rng(seed)
    image = blocky_image(rng, height, width, block=6, noise=25)
    seg_image, feat_image = feat.colour_space(image, space)
    labels, n = segment(seg_image, k)
    colour_bins, texture_bins = feat.pixel_bins(feat_image)
    features = feat.region_features(labels, n, colour_bins, texture_bins)
    return labels, n, colour_bins, texture_bins, features


def group(features, im_size, strategy):
    """``hierarchical_grouping`` of ``region_features``' output with a named strategy."""
    sizes, boxes, colour_hist, texture_hist, pairs = features
    return grouping.hierarchical_grouping(colour_hist, texture_hist, sizes, boxes, pairs, int(im_size),
                                          *grouping.STRATEGIES[strategy])


def slow_histograms(mask, colour_bins, texture_bins):
    """Histograms of the pixels in ``mask`` (bool [H*W]), straight from the pixel bins."""
    size = mask.sum()
    colour = np.concatenate([np.bincount(colour_bins[mask, c], minlength=25)
                             for c in range(colour_bins.shape[1])]) / (size * colour_bins.shape[1])
    texture = np.concatenate([np.bincount(texture_bins[mask, t], minlength=10)
                              for t in range(texture_bins.shape[1])]) / (size * texture_bins.shape[1])
    return colour, texture


def test_initial_features_match_a_slow_computation():
    labels, n, colour_bins, texture_bins, (sizes, boxes, colour, texture, pairs) = setup_case(0)
    assert n > 10
    height, width = labels.shape
    flat = labels.ravel()
    expected_pairs = set()
    for y in range(height):
        for x in range(width):
            for y2, x2 in ((y, x + 1), (y + 1, x)):
                if y2 < height and x2 < width and labels[y, x] != labels[y2, x2]:
                    a, b = sorted((labels[y, x], labels[y2, x2]))
                    expected_pairs.add((a, b))
    assert sorted(expected_pairs) == [tuple(p) for p in pairs.tolist()]
    for r in range(n):
        ys, xs = np.nonzero(labels == r)
        assert sizes[r] == len(ys)
        assert boxes[r].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
        c, t = slow_histograms(flat == r, colour_bins, texture_bins)
        np.testing.assert_allclose(colour[r], c, atol=1e-7)
        np.testing.assert_allclose(texture[r], t, atol=1e-7)
        assert abs(colour[r].sum() - 1) < 1e-5 and abs(texture[r].sum() - 1) < 1e-5


@pytest.mark.parametrize("strategy", ["CTSF", "TSF", "F", "S"])
@pytest.mark.parametrize("seed", [0, 1])
def test_merges_boxes_sizes_histograms(seed, strategy):
    labels, n, colour_bins, texture_bins, features = setup_case(seed, space="lab" if seed else "hsv")
    boxes, sizes, colour, texture, merges = group(features, labels.size, strategy)
    assert len(merges) == n - 1 and len(boxes) == 2 * n - 1
    assert sizes[-1] == labels.size
    assert boxes[-1].tolist() == [0, 0, labels.shape[1] - 1, labels.shape[0] - 1]
    members = [np.array([r]) for r in range(n)]
    used = np.zeros(2 * n - 1, bool)
    flat = labels.ravel()
    for m, (a, b) in enumerate(merges):
        t = n + m
        assert a < t and b < t and not used[a] and not used[b]  # each region merged once
        used[a] = used[b] = True
        members.append(np.concatenate([members[a], members[b]]))
        assert sizes[t] == sizes[a] + sizes[b]
        assert boxes[t].tolist() == [min(boxes[a, 0], boxes[b, 0]), min(boxes[a, 1], boxes[b, 1]),
                                     max(boxes[a, 2], boxes[b, 2]), max(boxes[a, 3], boxes[b, 3])]
        mask = np.isin(flat, members[t])
        ys, xs = np.divmod(np.nonzero(mask)[0], labels.shape[1])
        assert sizes[t] == mask.sum()
        assert boxes[t].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
        c, tex = slow_histograms(mask, colour_bins, texture_bins)
        np.testing.assert_allclose(colour[t], c, atol=2e-6)
        np.testing.assert_allclose(texture[t], tex, atol=2e-6)


def test_each_merge_is_the_most_similar_neighbouring_pair():
    """Against a slow greedy loop that recomputes everything from the pixels."""
    labels, n, colour_bins, texture_bins, features = setup_case(2)
    boxes, sizes, colour, texture, merges = group(features, labels.size, "CTSF")
    flat = labels.ravel()
    height, width = labels.shape
    members = {r: {r} for r in range(n)}
    adjacency = {tuple(p) for p in features[4].tolist()}

    def similarity(a, b):
        mask_a, mask_b = np.isin(flat, list(members[a])), np.isin(flat, list(members[b]))
        ca, ta = slow_histograms(mask_a, colour_bins, texture_bins)
        cb, tb = slow_histograms(mask_b, colour_bins, texture_bins)
        both = np.nonzero(mask_a | mask_b)[0]
        ys, xs = np.divmod(both, width)
        bbox = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        size = mask_a.sum() + mask_b.sum()
        return (np.minimum(ca, cb).sum() + np.minimum(ta, tb).sum()
                + 1 - size / flat.size + 1 - (bbox - size) / flat.size)

    for m, (a, b) in enumerate(merges[:25]):
        candidates = {p: similarity(*p) for p in adjacency}
        best = max(candidates.values())
        pair = (min(a, b), max(a, b))
        assert pair in candidates, "merged regions must be neighbours"
        assert candidates[pair] >= best - 1e-9
        t = n + m
        members[t] = members.pop(a) | members.pop(b)
        adjacency = {tuple(sorted((t if x in (a, b) else x, t if y in (a, b) else y)))
                     for x, y in adjacency}
        adjacency = {p for p in adjacency if p[0] != p[1]}


def test_single_region_has_no_merges():
    features = feat.region_features(np.zeros((3, 4), np.int32), 1, np.zeros((12, 3), np.uint8),
                                    np.zeros((12, 24), np.uint8))
    boxes, sizes, _, _, merges = group(features, 12, "CTSF")
    assert len(merges) == 0 and boxes.tolist() == [[0, 0, 3, 2]] and sizes.tolist() == [12]


def original_tie_rule_merges(features, im_size, strategy):
    """The original BlobStruct2HierarchicalGrouping loop, slowly: a list of pairs sorted
    ascending (stable) by similarity (rounded to float32, as ours), the LAST one merged, the
    merged region's pairs appended in ascending order of the neighbour's id."""
    sizes, boxes, colour, texture, pairs = features
    use = grouping.STRATEGIES[strategy]
    n = len(sizes)
    sizes, boxes = list(sizes), [list(b) for b in boxes]
    colour, texture = list(colour), list(texture)

    def sim(i, j):
        s = 0.0
        if use[0]:
            s += float(np.minimum(colour[i], colour[j]).sum(dtype=np.float32))
        if use[1]:
            s += float(np.minimum(texture[i], texture[j]).sum(dtype=np.float32))
        if use[2]:
            s += 1.0 - (sizes[i] + sizes[j]) / im_size
        if use[3]:
            w = max(boxes[i][2], boxes[j][2]) - min(boxes[i][0], boxes[j][0]) + 1
            h = max(boxes[i][3], boxes[j][3]) - min(boxes[i][1], boxes[j][1]) + 1
            s += 1.0 - (w * h - sizes[i] - sizes[j]) / im_size
        return np.float32(s)

    edges = [(int(a), int(b), sim(a, b)) for a, b in pairs]
    merges = []
    while edges:
        edges.sort(key=lambda e: e[2])  # stable
        a, b, _ = edges.pop()
        t = n + len(merges)
        merges.append((a, b))
        sizes.append(sizes[a] + sizes[b])
        boxes.append([min(boxes[a][0], boxes[b][0]), min(boxes[a][1], boxes[b][1]),
                      max(boxes[a][2], boxes[b][2]), max(boxes[a][3], boxes[b][3])])
        wa, wb = sizes[a] / sizes[t], sizes[b] / sizes[t]
        colour.append((wa * colour[a] + wb * colour[b]).astype(np.float32))
        texture.append((wa * texture[a] + wb * texture[b]).astype(np.float32))
        touching = [e for e in edges if {a, b} & set(e[:2])]
        edges = [e for e in edges if not {a, b} & set(e[:2])]
        neighbours = sorted({x for e in touching for x in e[:2]} - {a, b})
        edges += [(t, x, sim(t, x)) for x in neighbours]
    return merges


@pytest.mark.parametrize("strategy", ["S", "F"])
def test_ties_go_to_the_last_pair_as_the_original(strategy):
    """A grid of equal blocks: size and fill similarities tie all the time."""
    labels = np.repeat(np.repeat(np.arange(30, dtype=np.int32).reshape(5, 6), 4, 0), 4, 1)  # [20, 24]
    features = feat.region_features(labels, 30, np.zeros((480, 3), np.uint8), np.zeros((480, 24), np.uint8))
    merges = group(features, labels.size, strategy)[4]
    assert [tuple(m) for m in merges.tolist()] == original_tie_rule_merges(features, labels.size, strategy)
