"""cdul-server: CLIP-driven multi-label pseudo labels and prediction over gRPC, without torch."""

__version__ = "0.1.0"
