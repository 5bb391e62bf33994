"""Metrics a search filters on besides measured latency: the `Profiler` interface
(`profiler_base.py`), FLOPs and parameters (`counting.py`, `flop_count.py`), and per-choice
tables derived from NNI model spaces (`nni_tables.py`)."""
