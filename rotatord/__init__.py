"""rotatord: secrets and key-rotation daemon."""

__version__ = "0.1.0"
