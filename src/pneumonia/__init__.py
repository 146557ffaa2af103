"""Pneumonia detection on chest X-rays: train, evaluate, export to ONNX, serve."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pneumonia-detection")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
