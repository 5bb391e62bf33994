"""Work that drives a LatencyProfiler for a purpose of its own, and so sits above it:
calibrating nn-Meter to a device (`calibrate.py`) and memory as a Profiler measured in
fresh agent processes (`memory.py`)."""
