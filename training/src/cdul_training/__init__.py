"""CDUL training: gradient alignment, evaluation, and the embedded digits default."""

__version__ = "0.1.0"
