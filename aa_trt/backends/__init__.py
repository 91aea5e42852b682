"""Inference backends that stand in for the torch modules: onnxruntime (and TensorRT, later)."""
