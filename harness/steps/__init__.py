"""The steps a profiler takes between the cache and the pool, each given only what it uses:
the key scope of one device and input (`key_scope.py`), answering a batch of samples
(`batch.py`), limit decisions (`decider.py`) and the prediction fallback (`fallback.py`)."""
