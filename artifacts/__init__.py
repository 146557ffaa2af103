"""The shipped model (model.onnx with its card), installed as package data."""
