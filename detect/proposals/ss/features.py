"""Colour spaces, per-pixel histogram bins and per-region features for selective search.

Colour spaces ([SS] ``Image2ColourSpace.m``; uint8, ``im2uint8`` of a value in [0, 1]): ``hsv``
(MATLAB ``rgb2hsv``), ``lab`` (8-bit CIE L*a*b*), ``rgi``, ``h`` (the hue) and ``i`` (MATLAB
``rgb2gray``); how ``h`` and ``i`` are used: ``detect.proposals.ss``.

Per-pixel bins of one colour space, computed ONCE (``pixel_bins``), reused for every k:

- colour: 25 bins per channel, bin = round(v / 255 * 24), as the original
  ``BlobStructColourHist`` (so the two end bins are half as wide as the others);
- texture: Gaussian derivatives of each channel in 8 orientations 0, 45, ..., 315 degrees
  (steered from x and y; o + 180 is the negative of o, so only positive responses count), each
  quantised as the original ``BlobStructTextureHist`` (how we differ: ``detect.proposals.ss``).

``region_features`` then makes the regions' features in one pass over a label image.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from numba import njit

COLOUR_BINS = 25
TEXTURE_BINS = 10
ORIENTATIONS = 8
TEXTURE_SIGMA = 0.8  # original BlobStructTextureHist: Image2OrientedGradients(im, 0.8)
TEXTURE_MAX = 0.43  # original BlobStructTextureHist: "maximum value of gradient"
_JIT = dict(cache=True, nogil=True)


@njit(**_JIT)
def _im2uint8(value: float) -> np.uint8:
    return np.uint8(min(max(math.floor(value * 255.0 + 0.5), 0.0), 255.0))


@njit(**_JIT)
def _rgb_to(image: np.ndarray, space: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> space 0: hsv [H, W, 3], 1: rgi [H, W, 3], 2: gray [H, W, 1], uint8."""
    height, width = image.shape[:2]
    out = np.empty((height, width, 1 if space == 2 else 3), np.uint8)
    for y in range(height):
        for x in range(width):
            r = image[y, x, 0] / 255.0
            g = image[y, x, 1] / 255.0
            b = image[y, x, 2] / 255.0
            if space == 0:
                v = max(r, g, b)
                delta = v - min(r, g, b)
                h = 0.0
                if delta > 0.0:  # MATLAB rgb2hsv: the blue case overrides green overrides red
                    if b == v:
                        h = 4.0 + (r - g) / delta
                    elif g == v:
                        h = 2.0 + (b - r) / delta
                    else:
                        h = (g - b) / delta
                    h /= 6.0
                    if h < 0.0:
                        h += 1.0
                s = delta / v if v > 0.0 else 0.0
                out[y, x, 0] = _im2uint8(h)
                out[y, x, 1] = _im2uint8(s)
                out[y, x, 2] = _im2uint8(v)
            elif space == 1:
                total = r + g + b
                out[y, x, 0] = _im2uint8(r / total if total > 0.0 else 1.0 / 3.0)
                out[y, x, 1] = _im2uint8(g / total if total > 0.0 else 1.0 / 3.0)
                out[y, x, 2] = _im2uint8(total / 3.0)
            else:
                out[y, x, 0] = _im2uint8(0.298936021293775 * r + 0.587043074451121 * g
                                         + 0.114020904255103 * b)
    return out


def colour_space(image: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB [H, W, 3] -> (image to segment uint8 [H, W, 3], feature image uint8 [H, W, C]);
    C = 3 for "hsv", "lab", "rgi", 1 for "h", "i"."""
    if name == "lab":
        lab = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2Lab)
        return lab, lab
    converted = _rgb_to(np.ascontiguousarray(image), {"hsv": 0, "h": 0, "rgi": 1, "i": 2}[name])
    if name in ("hsv", "rgi"):
        return converted, converted
    single = np.ascontiguousarray(converted[:, :, :1])  # h: the hue channel; i: the intensity
    return np.ascontiguousarray(np.repeat(single, 3, axis=2)), single


@njit(**_JIT)
def _gaussian_kernels(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(Gaussian, first derivative of Gaussian), float64 [2r + 1] each, r = ceil(4 sigma)."""
    radius = int(math.ceil(4.0 * sigma))
    gauss = np.empty(2 * radius + 1)
    for i in range(-radius, radius + 1):
        gauss[i + radius] = math.exp(-0.5 * i * i / (sigma * sigma))
    gauss /= gauss.sum()
    deriv = np.empty(2 * radius + 1)
    for i in range(-radius, radius + 1):
        deriv[i + radius] = -i / (sigma * sigma) * gauss[i + radius]
    return gauss, deriv


@njit(**_JIT)
def _convolve_x(src: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each row with ``kernel`` (odd length), borders replicated: [H, W] -> [H, W]."""
    height, width = src.shape
    radius = kernel.size // 2
    padded = np.empty(width + 2 * radius)
    out = np.zeros((height, width))
    for y in range(height):
        for x in range(width + 2 * radius):
            padded[x] = src[y, min(max(x - radius, 0), width - 1)]
        for i in range(kernel.size):
            weight = kernel[i]
            for x in range(width):
                out[y, x] += weight * padded[x + i]
    return out


@njit(**_JIT)
def _convolve_y(src: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each column with ``kernel`` (odd length), borders replicated. Row by row, each
    output row summed over the kernel's rows in kernel order (the rows stay in cache)."""
    height, width = src.shape
    radius = kernel.size // 2
    out = np.zeros((height, width))
    for y in range(height):
        for i in range(-radius, radius + 1):
            weight = kernel[i + radius]
            row = min(max(y + i, 0), height - 1)
            for x in range(width):
                out[y, x] += weight * src[row, x]
    return out


@njit(**_JIT)
def pixel_bins(feat_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel bins of a colour space image uint8 [H, W, C]: (colour uint8 [H * W, C]; texture
    uint8 [H * W, 8 C], orientation o of channel c at column c * 8 + o)."""
    height, width, channels = feat_image.shape
    n = height * width
    colour = np.empty((n, channels), np.uint8)
    texture = np.empty((n, ORIENTATIONS * channels), np.uint8)
    gauss, deriv = _gaussian_kernels(TEXTURE_SIGMA)
    scale = (TEXTURE_BINS - 1) / TEXTURE_MAX
    cosines = (1.0, math.sqrt(0.5), 0.0, -math.sqrt(0.5))
    sines = (0.0, math.sqrt(0.5), 1.0, math.sqrt(0.5))
    plane = np.empty((height, width))
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                value = feat_image[y, x, c]
                # round(v * 24 / 255) in integers (no ties: 48 v is even, 255 odd)
                colour[y * width + x, c] = (np.int32(value) * (2 * COLOUR_BINS - 2) + 255) // 510
                plane[y, x] = value / 255.0
        grad_x = _convolve_y(_convolve_x(plane, deriv), gauss).ravel()
        grad_y = _convolve_y(_convolve_x(plane, gauss), deriv).ravel()
        for p in range(n):
            gx = grad_x[p]
            gy = grad_y[p]
            for o in range(4):  # selects, not branches: the sign of d is a coin flip
                d = cosines[o] * gx + sines[o] * gy
                b = np.uint8(min(int(abs(d) * scale + 0.5), TEXTURE_BINS - 1))  # round, capped
                positive = d > 0.0
                texture[p, c * ORIENTATIONS + o] = b if positive else np.uint8(0)
                texture[p, c * ORIENTATIONS + o + 4] = np.uint8(0) if positive else b
    return colour, texture


@njit(**_JIT)
def region_features(labels: np.ndarray, n_regions: int, colour_bins: np.ndarray,
                    texture_bins: np.ndarray):
    """Features of every region of labels int32 [H, W] (0..n-1), with ``pixel_bins``' bins:
    sizes int64 [n], boxes int32 [n, 4] (x0, y0, x1, y1 inclusive), colour_hist float32 [n, 25 C]
    and texture_hist float32 [n, 80 C] (rows sum to 1), pairs int32 [m, 2] (a < b, sorted) of
    4-connected neighbours."""
    height, width = labels.shape
    channels = colour_bins.shape[1]
    n_tex = texture_bins.shape[1]
    sizes = np.zeros(n_regions, np.int64)
    boxes = np.empty((n_regions, 4), np.int32)
    boxes[:, 0] = width
    boxes[:, 1] = height
    boxes[:, 2] = -1
    boxes[:, 3] = -1
    colour_counts = np.zeros((n_regions, COLOUR_BINS * channels), np.int32)
    texture_counts = np.zeros((n_regions, TEXTURE_BINS * n_tex), np.int32)
    keys = np.empty(2 * height * width, np.int64)
    n_keys = 0
    for y in range(height):
        for x in range(width):
            p = y * width + x
            label = labels[y, x]
            sizes[label] += 1
            boxes[label, 0] = min(boxes[label, 0], x)
            boxes[label, 1] = min(boxes[label, 1], y)
            boxes[label, 2] = max(boxes[label, 2], x)
            boxes[label, 3] = max(boxes[label, 3], y)
            for c in range(channels):
                colour_counts[label, c * COLOUR_BINS + colour_bins[p, c]] += 1
            for t in range(n_tex):
                texture_counts[label, t * TEXTURE_BINS + texture_bins[p, t]] += 1
            if x + 1 < width and labels[y, x + 1] != label:
                other = labels[y, x + 1]
                keys[n_keys] = min(label, other) * np.int64(n_regions) + max(label, other)
                n_keys += 1
            if y + 1 < height and labels[y + 1, x] != label:
                other = labels[y + 1, x]
                keys[n_keys] = min(label, other) * np.int64(n_regions) + max(label, other)
                n_keys += 1
    keys = np.unique(keys[:n_keys])  # sorted
    pairs = np.empty((keys.size, 2), np.int32)
    pairs[:, 0] = keys // n_regions
    pairs[:, 1] = keys % n_regions
    colour_hist = (colour_counts * (1.0 / (sizes * channels))[:, np.newaxis]).astype(np.float32)
    texture_hist = (texture_counts * (1.0 / (sizes * n_tex))[:, np.newaxis]).astype(np.float32)
    return sizes, boxes, colour_hist, texture_hist, pairs
