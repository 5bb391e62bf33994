"""Latency predicted instead of measured: nn-Meter's predictors (`nn_meter.py`), kernel
detection and features of any exported graph (`kernels.py`, `fast_detector.py`), forests as
arrays (`flat_forest.py`), the safe unpickler (`sklearn_pickle.py`), a device's stored
calibration (`calibration.py`), accuracy figures (`accuracy.py`), and the device's own
latency model (`latency_model.py`). A prediction is never stored as a measurement."""
