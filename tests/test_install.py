"""A broken torch/torchvision pair or an OpenCV without ximgproc must fail CI, not a user."""

import torch
import torchvision


def test_torchvision_ops_run_against_this_torch():
    from torchvision.ops import nms, roi_align, roi_pool

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    feats = torch.arange(16.0).reshape(1, 1, 4, 4)
    rois = [torch.tensor([[0.0, 0.0, 3.0, 3.0]])]
    assert roi_pool(feats, rois, output_size=(1, 1)).item() == 15.0
    assert roi_align(feats, rois, output_size=(1, 1), aligned=False).shape == (1, 1, 1, 1)
    assert torchvision.__version__ and torch.__version__


def test_opencv_has_selective_search():
    import cv2

    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    assert ss is not None


def test_check_install_passes():
    from detect.check_install import main

    assert main() == 0
