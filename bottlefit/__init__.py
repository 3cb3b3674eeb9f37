"""BottleFit: split-computing models from trained checkpoint to verified edge-device artifacts."""

__version__ = "0.1.0"
