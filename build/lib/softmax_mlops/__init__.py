"""Softmax regression on Fashion-MNIST, from scratch and concise, as a DVC + MLflow + Prefect + ONNX pipeline."""

__version__ = "0.1.0"
