"""runner: a declarative experiment-matrix runner for YOLO detectors on TensorRT."""

__version__ = "0.1.0"
