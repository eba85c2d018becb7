"""A broken torch/torchvision pair or an OpenCV without ximgproc must fail CI, not a user."""

import numpy as np
import torch


def test_torchvision_ops_run_against_this_torch():
    from torchvision.ops import nms, roi_align, roi_pool

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    feats = torch.arange(16.0).reshape(1, 1, 4, 4)
    rois = [torch.tensor([[0.0, 0.0, 3.0, 3.0]])]
    assert roi_pool(feats, rois, output_size=(1, 1)).item() == 15.0
    # feats[y, x] = 4y + x is linear, so the average of roi_align's bilinear samples (at 0.5, 1.5
    # and 2.5 on each axis of the box [0, 3] x [0, 3]) is its value at the centre (1.5, 1.5).
    assert roi_align(feats, rois, output_size=(1, 1), aligned=False).item() == 7.5


def test_opencv_has_selective_search():
    import cv2

    image = np.zeros((40, 60, 3), np.uint8)
    image[10:30, 20:45] = (255, 0, 0)  # a red rectangle on black
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(image)
    ss.switchToSingleStrategy()
    rects = np.asarray(ss.process()).reshape(-1, 4)  # [R, 4] (x, y, w, h)
    assert len(rects) >= 1
    assert (rects[:, 0] + rects[:, 2] <= 60).all() and (rects[:, 1] + rects[:, 3] <= 40).all()
    assert [20, 10, 25, 20] in rects.tolist()  # the rectangle is one of the regions


def test_check_install_passes():
    from detect.check_install import main

    assert main() == 0
