"""The torch side: configuration, augmentation, networks, the training loop and export.

Nothing under ``serve/``, ``score/``, ``predictor`` or ``preprocess`` may import this package
(tests/test_boundaries.py enforces it): serving runs on onnxruntime, numpy and Pillow only.
"""
