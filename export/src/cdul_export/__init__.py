"""cdul-export: open_clip models and cdul classifiers to an ONNX model repository."""

__version__ = "0.1.0"
