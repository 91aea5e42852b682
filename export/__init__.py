"""`aa-trt build`: every submodel exported to ONNX, checked, and compiled for TensorRT or OpenVINO; one
declaration per graph (graphs.py, on the tensor names of aa_trt.backends.declarations)."""
