"""From a subnet or a file to the bytes a device runs: a subnet frozen and exported to ONNX
with its canonical graph hash (`graph.py`), spliced from per-block pieces (`compose.py`), or
any ONNX file checked, its shapes resolved and converted to another precision
(`model_file.py`)."""
