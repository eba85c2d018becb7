"""Colour spaces and per-pixel bins against straightforward re-implementations."""

import colorsys

import numpy as np
from scipy.ndimage import correlate1d

from detect.proposals.ss import features as feat


def test_colour_spaces():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    image[0, 0] = 0  # black
    image[0, 1] = (200, 200, 200)  # grey
    image[0, 2] = (255, 0, 255)  # max shared by r and b
    rgb = image.astype(np.float64) / 255
    hsv = np.array([[colorsys.rgb_to_hsv(*p) for p in row] for row in rgb])
    seg_image, feat_image = feat.colour_space(image, "hsv")
    assert seg_image is feat_image and seg_image.dtype == np.uint8
    np.testing.assert_array_equal(seg_image, np.floor(hsv * 255 + 0.5).astype(np.uint8))
    total = rgb.sum(2)
    safe = np.where(total > 0, total, 1)
    rgi = np.stack([np.where(total > 0, rgb[..., 0] / safe, 1 / 3), np.where(total > 0, rgb[..., 1] / safe, 1 / 3),
                    total / 3], axis=2)
    np.testing.assert_array_equal(feat.colour_space(image, "rgi")[0], np.floor(rgi * 255 + 0.5).astype(np.uint8))
    gray = np.floor(rgb @ np.array([0.298936021293775, 0.587043074451121, 0.114020904255103]) * 255 + 0.5)
    seg_image, feat_image = feat.colour_space(image, "i")
    assert feat_image.shape == (9, 11, 1) and seg_image.shape == (9, 11, 3)
    np.testing.assert_array_equal(feat_image[:, :, 0], gray.astype(np.uint8))
    np.testing.assert_array_equal(seg_image, np.repeat(feat_image, 3, axis=2))
    seg_image, feat_image = feat.colour_space(image, "h")
    np.testing.assert_array_equal(feat_image[:, :, 0], feat.colour_space(image, "hsv")[0][:, :, 0])
    lab = feat.colour_space(image, "lab")[0]
    assert lab[0, 0].tolist() == [0, 128, 128] and abs(int(lab[0, 1, 1]) - 128) <= 1


def test_pixel_bins():
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, (6, 8, 3))
    image = np.clip(np.repeat(np.repeat(coarse, 5, 0), 5, 1) + rng.integers(-9, 10, (30, 40, 3)), 0, 255)
    image = image.astype(np.uint8)
    colour, texture = feat.pixel_bins(image)
    assert colour.shape == (1200, 3) and texture.shape == (1200, 24)
    # the original BlobStructColourHist: round(v / 255 * 24), end bins half-width
    expected_colour = np.floor(image.reshape(-1, 3) / 255 * 24 + 0.5).astype(int)
    np.testing.assert_array_equal(colour, expected_colour)
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    counts = np.bincount(feat.pixel_bins(np.repeat(values, 3, axis=2))[0][:, 0], minlength=25)
    assert counts[0] == counts[24] == 6 and set(counts[1:24]) <= {10, 11}
    # Gaussian derivatives (sigma 0.8, radius 4), steered to 0, 45, ..., 315 degrees
    r = np.arange(-4, 5)
    gauss = np.exp(-0.5 * r ** 2 / 0.64)
    gauss /= gauss.sum()
    deriv = -r / 0.64 * gauss
    expected = np.zeros((1200, 24), int)
    for c in range(3):
        plane = image[:, :, c] / 255.0
        gx = correlate1d(correlate1d(plane, deriv, axis=1, mode="nearest"), gauss, axis=0, mode="nearest")
        gy = correlate1d(correlate1d(plane, gauss, axis=1, mode="nearest"), deriv, axis=0, mode="nearest")
        for o in range(8):
            angle = np.deg2rad(45 * o)
            response = np.maximum(np.cos(angle) * gx + np.sin(angle) * gy, 0).ravel()
            expected[:, c * 8 + o] = np.minimum(np.floor(response * (9 / 0.43) + 0.5).astype(int), 9)
    assert (texture == expected).mean() > 0.999  # a bin edge may fall either way in float
    assert np.abs(texture.astype(int) - expected).max() <= 1
    assert texture.max() > 3  # real edges reach the upper bins
    step = np.zeros((12, 12, 3), np.uint8)
    step[:, 6:] = 255  # a unit step: its response (about 0.5) reaches the top bin
    assert feat.pixel_bins(step)[1].max() == 9
