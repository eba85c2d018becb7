"""detect: selective search, R-CNN and Fast R-CNN, with one evaluation path to compare them.

Conventions used everywhere in the package:
- Boxes are float xyxy in pixels of the original image (x1, y1, x2, y2), converted once at the
  edges from OpenCV's xywh, COCO's xywh and VOC's 1-based corners.
- Class index 0 is background; object classes are 1..K. ``Dataset.category_ids`` maps them
  back to the dataset's own category ids, in one place (``detect.data``).
- Shape shorthand in comments: N images, R proposals, G ground-truth boxes, K object classes.
"""

__version__ = "0.1.0"
