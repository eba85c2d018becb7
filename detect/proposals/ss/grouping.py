"""Greedy hierarchical grouping of selective search [SS, section 3.1 and 3.2].

The most similar pair of NEIGHBOURING regions is merged until one is left. The similarity of
regions i, j is the sum of the enabled terms:

- colour:  sum_k min(c_i[k], c_j[k])  (histogram intersection, L1-normalised histograms)
- texture: sum_k min(t_i[k], t_j[k])
- size:    1 - (size_i + size_j) / size_im
- fill:    1 - (size(BB_ij) - size_i - size_j) / size_im  (BB_ij: the box around both)

The merged region t gets size_i + size_j, the union of the boxes, histograms
(size_i h_i + size_j h_j) / size_t and neighbours N(i) | N(j) - {i, j}.

Implementation: a max-heap of candidate pairs with lazy invalidation (a popped pair whose
region was merged is skipped); a key is the similarity as float32 above the pair's push number
(ties: ``detect.proposals.ss``). ``merged_into`` maps a stale neighbour id to the region that
absorbed it. All numba, GIL released.
"""

from __future__ import annotations

import numpy as np
from numba import njit

STRATEGIES = {  # name -> (colour, texture, size, fill)
    "CTSF": (True, True, True, True),
    "TSF": (False, True, True, True),
    "F": (False, False, False, True),
    "S": (False, False, True, False),
}
_JIT = dict(cache=True, nogil=True)


@njit(fastmath=True, **_JIT)
def _intersection(hist, i, j):
    """sum_k min(hist[i, k], hist[j, k]) of float32 rows. fastmath lets LLVM vectorise the
    sum (reassociation); the compiled order is fixed, so results stay deterministic."""
    acc = np.float32(0.0)
    for k in range(hist.shape[1]):
        acc += min(hist[i, k], hist[j, k])
    return acc


@njit(inline="always", **_JIT)
def _similarity(i, j, colour_hist, texture_hist, sizes, boxes, im_size,
                use_colour, use_texture, use_size, use_fill):
    sim = 0.0
    if use_colour:
        sim += _intersection(colour_hist, i, j)
    if use_texture:
        sim += _intersection(texture_hist, i, j)
    if use_size:
        sim += 1.0 - (sizes[i] + sizes[j]) / im_size
    if use_fill:
        width = max(boxes[i, 2], boxes[j, 2]) - min(boxes[i, 0], boxes[j, 0]) + 1
        height = max(boxes[i, 3], boxes[j, 3]) - min(boxes[i, 1], boxes[j, 1]) + 1
        sim += 1.0 - (width * height - sizes[i] - sizes[j]) / im_size
    return sim


_LOW32 = np.uint64(0xFFFFFFFF)


@njit(inline="always", **_JIT)
def _heap_key(sim, entry):
    """uint64 heap key: the float32 bits of sim (>= 0, so the bits order like the values)
    above the entry number, so that among equal similarities the later entry wins."""
    bits = np.uint64(np.float32(max(sim, 0.0)).view(np.uint32))
    return (bits << np.uint64(32)) | np.uint64(entry)


@njit(inline="always", **_JIT)
def _heap_push(heap, n_heap, key):
    """Insert key into the max-heap heap[:n_heap]; returns the new length."""
    pos = n_heap
    while pos > 0:
        parent = (pos - 1) >> 1
        if heap[parent] < key:
            heap[pos] = heap[parent]
            pos = parent
        else:
            break
    heap[pos] = key
    return n_heap + 1


@njit(inline="always", **_JIT)
def _heap_pop(heap, n_heap):
    """Remove the largest key of heap[:n_heap]; returns (its entry index, new length)."""
    top = heap[0]
    n_heap -= 1
    last = heap[n_heap]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= n_heap:
            break
        if child + 1 < n_heap and heap[child + 1] > heap[child]:
            child += 1
        if heap[child] > last:
            heap[pos] = heap[child]
            pos = child
        else:
            break
    heap[pos] = last
    return np.int64(top & _LOW32), n_heap


@njit(inline="always", **_JIT)
def _grow(array, needed):
    if needed <= array.size:
        return array
    bigger = np.empty(max(needed, 2 * array.size), array.dtype)
    bigger[:array.size] = array
    return bigger


@njit(inline="always", **_JIT)
def _find(merged_into, x):
    root = x
    while merged_into[root] >= 0:
        root = merged_into[root]
    while merged_into[x] >= 0 and merged_into[x] != root:
        nxt = merged_into[x]
        merged_into[x] = root
        x = nxt
    return root


@njit(**_JIT)
def hierarchical_grouping(colour_hist, texture_hist, sizes, boxes, pairs, im_size,
                          use_colour, use_texture, use_size, use_fill):
    """Greedy grouping of one segmentation (``features.region_features``' outputs, im_size = H * W)
    with one strategy (the four booleans) -> for all T regions in creation order: boxes int32
    [T, 4], sizes int64 [T], colour_hist [T, Kc], texture_hist [T, Kt], merges int32 [T - n, 2]."""
    n = sizes.size
    total = 2 * n - 1
    n_colour = colour_hist.shape[1]
    n_texture = texture_hist.shape[1]
    all_boxes = np.empty((total, 4), np.int32)
    all_boxes[:n] = boxes
    all_sizes = np.empty(total, np.int64)
    all_sizes[:n] = sizes
    all_colour = np.empty((total, n_colour), np.float32)
    all_colour[:n] = colour_hist
    all_texture = np.empty((total, n_texture), np.float32)
    all_texture[:n] = texture_hist
    merges = np.empty((max(n - 1, 0), 2), np.int32)
    merged_into = np.full(total, -1, np.int32)
    mark = np.full(total, -1, np.int32)
    im_size_f = float(im_size)

    # neighbour lists of the initial regions (CSR in a growable buffer)
    start = np.zeros(total, np.int64)
    length = np.zeros(total, np.int64)
    for e in range(pairs.shape[0]):
        length[pairs[e, 0]] += 1
        length[pairs[e, 1]] += 1
    used = 0
    for r in range(n):
        start[r] = used
        used += length[r]
    data = np.empty(max(2 * used, 16), np.int32)
    fill = start[:n].copy()
    for e in range(pairs.shape[0]):
        a = pairs[e, 0]
        b = pairs[e, 1]
        data[fill[a]] = b
        fill[a] += 1
        data[fill[b]] = a
        fill[b] += 1

    # candidate pairs: entry arrays (the two regions) + a max-heap of packed keys
    capacity = max(2 * pairs.shape[0], 16)
    ent_a = np.empty(capacity, np.int32)
    ent_b = np.empty(capacity, np.int32)
    heap = np.empty(capacity, np.uint64)
    n_ent = pairs.shape[0]  # entry e is pair e
    n_heap = 0
    ent_a[:n_ent] = pairs[:, 0]
    ent_b[:n_ent] = pairs[:, 1]
    for e in range(n_ent):
        sim = _similarity(pairs[e, 0], pairs[e, 1], all_colour, all_texture, all_sizes, all_boxes,
                          im_size_f, use_colour, use_texture, use_size, use_fill)
        n_heap = _heap_push(heap, n_heap, _heap_key(sim, e))

    n_merges = 0
    while n_heap > 0:
        top, n_heap = _heap_pop(heap, n_heap)
        i = ent_a[top]
        j = ent_b[top]
        if merged_into[i] >= 0 or merged_into[j] >= 0:
            continue  # stale pair
        t = n + n_merges
        merges[n_merges, 0] = i
        merges[n_merges, 1] = j
        n_merges += 1
        size_i = all_sizes[i]
        size_j = all_sizes[j]
        all_sizes[t] = size_i + size_j
        all_boxes[t, 0] = min(all_boxes[i, 0], all_boxes[j, 0])
        all_boxes[t, 1] = min(all_boxes[i, 1], all_boxes[j, 1])
        all_boxes[t, 2] = max(all_boxes[i, 2], all_boxes[j, 2])
        all_boxes[t, 3] = max(all_boxes[i, 3], all_boxes[j, 3])
        wi = size_i / float(size_i + size_j)
        wj = size_j / float(size_i + size_j)
        for k in range(n_colour):
            all_colour[t, k] = wi * all_colour[i, k] + wj * all_colour[j, k]
        for k in range(n_texture):
            all_texture[t, k] = wi * all_texture[i, k] + wj * all_texture[j, k]
        merged_into[i] = t
        merged_into[j] = t

        # neighbours of t: live regions adjacent to i or j, each once
        data = _grow(data, used + length[i] + length[j])
        start[t] = used
        mark[t] = t
        for src in (i, j):
            for q in range(start[src], start[src] + length[src]):
                other = _find(merged_into, data[q])
                if mark[other] != t:
                    mark[other] = t
                    data[used] = other
                    used += 1
        length[t] = used - start[t]
        data[start[t]:used] = np.sort(data[start[t]:used])  # pushed in ascending id order

        needed = n_ent + length[t]
        if needed > ent_a.size:
            ent_a = _grow(ent_a, needed)
            ent_b = _grow(ent_b, needed)
            heap = _grow(heap, needed)
        for q in range(start[t], start[t] + length[t]):
            other = data[q]
            ent_a[n_ent] = t
            ent_b[n_ent] = other
            sim = _similarity(t, other, all_colour, all_texture, all_sizes, all_boxes,
                              im_size_f, use_colour, use_texture, use_size, use_fill)
            n_heap = _heap_push(heap, n_heap, _heap_key(sim, n_ent))
            n_ent += 1

    end = n + n_merges
    return (all_boxes[:end], all_sizes[:end], all_colour[:end], all_texture[:end],
            merges[:n_merges])
