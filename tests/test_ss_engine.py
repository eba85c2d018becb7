"""Public API: ranking, determinism, threads, edge images, recall sanity."""

import numpy as np
import pytest

from detect.proposals.ss.engine import selective_search_boxes
from detect.proposals.ss.ranking import hierarchy_positions, rank_boxes
from conftest import blocky_image


@pytest.fixture(scope="module")
def photo_like():
    return blocky_image(np.random.default_rng(5), 60, 80, block=10, noise=30)


def check_boxes(boxes, scores, height, width):
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(scores) == len(boxes) >= 1
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    assert (np.diff(scores) >= 0).all()


# ---- ranking --------------------------------------------------------------------------------

def test_positions_follow_the_paper():
    rows, positions = hierarchy_positions(4, 7, True)  # 4 initial, 3 merges
    assert rows.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert positions.tolist() == [4, 4, 4, 4, 3, 2, 1]  # last merge = position 1
    rows, positions = hierarchy_positions(4, 7, False)
    assert rows.tolist() == [4, 5, 6] and positions.tolist() == [3, 2, 1]
    rows, positions = hierarchy_positions(1, 1, True)
    assert rows.tolist() == [0] and positions.tolist() == [1]


def test_rank_boxes_sorts_and_removes_duplicates():
    boxes = np.array([[0, 0, 1, 1], [2, 2, 3, 3], [0, 0, 3, 3], [0, 0, 3, 3]], np.int32)
    ranked, values = rank_boxes([(boxes[:3], 2, True), (np.array([[0, 0, 1, 1], [2, 2, 3, 3], [0, 0, 3, 3]], np.int32), 2, False)],
                                randomize=False)
    assert ranked.tolist() == [[0, 0, 3, 3], [0, 0, 1, 1], [2, 2, 3, 3]]
    assert values.tolist() == [1, 2, 2]


def test_whole_image_first_without_randomness(photo_like):
    for mode in ("single", "fast"):
        boxes, scores = selective_search_boxes(photo_like, mode=mode, randomize=False)
        assert boxes[0].tolist() == [0, 0, 80, 60]
        assert scores[0] == 1
        check_boxes(boxes, scores, 60, 80)


def test_threads_give_byte_identical_results(photo_like):
    for mode in ("fast", "quality"):
        one = selective_search_boxes(photo_like, mode=mode, seed=3, threads=1)
        two = selective_search_boxes(photo_like, mode=mode, seed=3, threads=2)
        again = selective_search_boxes(photo_like, mode=mode, seed=3, threads=1)
        assert one[0].tobytes() == two[0].tobytes() == again[0].tobytes()
        assert one[1].tobytes() == two[1].tobytes() == again[1].tobytes()


def test_different_seeds_differ(photo_like):
    a = selective_search_boxes(photo_like, seed=0)
    b = selective_search_boxes(photo_like, seed=1)
    assert a[0].tobytes() != b[0].tobytes()
    assert {tuple(r) for r in a[0].tolist()} == {tuple(r) for r in b[0].tolist()}  # same set


def test_modes_make_more_boxes(photo_like):
    counts = [len(selective_search_boxes(photo_like, mode=m)[0]) for m in ("single", "fast", "quality")]
    assert counts[0] < counts[1] < counts[2]


def test_timings_are_reported(photo_like):
    timings = {}
    selective_search_boxes(photo_like, timings=timings)
    for key in ("segmentation", "features", "grouping", "total"):
        assert timings[key] >= 0
    assert timings["total"] >= timings["segmentation"]


# ---- edge images ----------------------------------------------------------------------------

def test_empty_image_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        selective_search_boxes(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        selective_search_boxes(np.zeros((0, 5, 3), np.uint8))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        selective_search_boxes(np.zeros((8, 8, 3), np.uint16))
    with pytest.raises(ValueError, match="uint8"):
        selective_search_boxes(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="3 channels"):
        selective_search_boxes(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="mode"):
        selective_search_boxes(np.zeros((8, 8, 3), np.uint8), mode="best")
    with pytest.raises(ValueError, match="seed"):
        selective_search_boxes(np.zeros((8, 8, 3), np.uint8), seed=-1)


@pytest.mark.parametrize("mode", ["single", "fast", "quality"])
def test_one_pixel(mode):
    boxes, scores = selective_search_boxes(np.full((1, 1, 3), 7, np.uint8), mode=mode)
    assert boxes.tolist() == [[0, 0, 1, 1]] and scores.shape == (1,)


def test_uniform_image_gives_the_whole_image_box():
    boxes, _ = selective_search_boxes(np.full((40, 30, 3), 128, np.uint8), mode="quality")
    assert boxes.tolist() == [[0, 0, 30, 40]]


@pytest.mark.parametrize("shape", [(4, 200), (200, 4), (1, 50), (50, 1), (2, 3)])
def test_tiny_and_elongated(shape):
    image = blocky_image(np.random.default_rng(7), *shape, block=3, noise=40)
    boxes, scores = selective_search_boxes(image, mode="fast", randomize=False)
    check_boxes(boxes, scores, *shape)
    assert boxes[0].tolist() == [0, 0, shape[1], shape[0]]


def test_grayscale_replicated():
    gray = blocky_image(np.random.default_rng(8), 50, 70, block=10)[:, :, 0]
    image = np.repeat(gray[:, :, None], 3, axis=2)
    boxes, scores = selective_search_boxes(image, mode="quality")
    check_boxes(boxes, scores, 50, 70)
    assert len(boxes) > 10


def test_non_contiguous_input(photo_like):
    view = photo_like[:, ::-1]
    a = selective_search_boxes(view)
    b = selective_search_boxes(np.ascontiguousarray(view))
    assert a[0].tobytes() == b[0].tobytes()


# ---- recall sanity --------------------------------------------------------------------------

def iou(box, boxes):
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    return inter / (area + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter)


def test_recall_on_rectangles_over_texture():
    rng = np.random.default_rng(11)
    height, width = 180, 240
    yy, xx = np.mgrid[:height, :width]
    background = 110 + 40 * np.sin(xx / 3.0) * np.cos(yy / 5.0)
    image = np.clip(background[:, :, None] + rng.normal(0, 12, (height, width, 3)), 0, 255)
    objects = [(20, 15, 90, 70, (220, 30, 30)), (120, 30, 220, 90, (30, 200, 40)),
               (40, 110, 110, 170, (40, 60, 230)), (150, 120, 200, 165, (240, 230, 40))]
    for x0, y0, x1, y1, colour in objects:
        image[y0:y1, x0:x1] = colour
    boxes, _ = selective_search_boxes(image.astype(np.uint8), mode="fast")
    for x0, y0, x1, y1, _ in objects:
        assert iou(np.array([x0, y0, x1, y1], float), boxes.astype(float)).max() >= 0.9


# ---- the OpenCV reference engine ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["single", "fast", "quality"])
def test_opencv_paper_engine(mode):
    from detect.proposals.selective_search import opencv_selective_search

    image = blocky_image(np.random.default_rng(9), 40, 56, block=8, noise=20)
    boxes = opencv_selective_search(image, mode=mode)
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4 and len(boxes) > 5
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 56).all() and (boxes[:, 3] <= 40).all()
    assert [0, 0, 56, 40] in boxes.tolist()  # the last merge: whole image, exclusive corners
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    again = opencv_selective_search(image, mode=mode)
    assert boxes.tobytes() == again.tobytes()  # srand(1) before each run
