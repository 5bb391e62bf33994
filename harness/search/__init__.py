"""Search with hardware in the loop: multi-trial strategies and their middleware
(`strategies.py`), per-block latency lookup tables built on a device (`lut.py`), and our
penalties and filter inside NNI's one-shot strategies (`nni_oneshot.py`)."""
