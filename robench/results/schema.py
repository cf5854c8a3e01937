"""The schema names results documents carry; kept apart from the document builder so that reading a
document (``gate``, ``compare``, ``plot``, ``report``) does not import torch."""

SCHEMA = "robench.results/1"
PIXEL_SCHEMA = "robench.pixel-index/1"
