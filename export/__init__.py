"""ONNX export of every submodel and TensorRT engines (issue #5): one declaration per graph."""
