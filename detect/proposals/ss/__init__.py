"""Fast, deterministic selective search (Uijlings et al., IJCV 2013) in numpy + numba.

``engine.selective_search_boxes`` runs the pipeline on one image (stages: ``segmentation``,
``features``, ``grouping``, ``ranking``); ``detect.proposals.selective_search`` wraps it.

The original code: the IJCV release (``SelectiveSearchCodeIJCV``; a copy is in
zouchuhang/LayoutNet, ``matlab/panoContext_code/Toolbox/``) and rbgirshick/rcnn
``selective_search/selective_search_boxes.m``. The release's ``BlobStructColourHist``,
``BlobStructTextureHist`` and ``BlobStruct2HierarchicalGrouping`` are obfuscated ``.p`` files;
their readable ``.m`` versions come from zhulei2016/RST-saliency (``SelectiveSearch/``), whose
other local edits were not taken. The one list of where we differ from the original, and why:

- edges are sorted with a stable radix sort (std::sort left ties unspecified): reproducible;
- texture: first-order Gaussian derivatives with sigma 0.8 and round(r * 9 / 0.43) bins, as the
  released code (the paper says sigma 1), but of every channel, as the paper (the release took
  the first channel three times, a bug); responses over the top bin are capped, not spilled
  into the next orientation's; borders are replicated (its zero padding makes a false edge
  along every border); the diagonal derivatives are steered from x and y (the release's
  ``anigauss`` is equal up to discretisation);
- Lab is OpenCV's 8-bit conversion (D65), not MATLAB's ``applycform``; the unpublished
  ``Rgb2Rgi``: r = R/(R+G+B), g = G/(R+G+B) (1/3 for black), I = (R+G+B)/3;
- H and I: the image to segment is the channel replicated 3 times (as the original); the
  histograms use the single channel (identical similarities, a third of the work);
- grouping keeps histograms in float32 and orders pairs by similarity rounded to float32 (the
  original: doubles); ties go to the pair pushed last, as the original's ascending sort; the
  ranking draws from numpy's generator seeded with (seed, hierarchy index), not MATLAB's ``rand``.
"""

from detect.proposals.ss.engine import MODES, selective_search_boxes, warm_up

__all__ = ["MODES", "selective_search_boxes", "warm_up"]
