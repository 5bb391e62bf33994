"""What is kept: the cache key (`key.py`: the only place a MeasurementKey's parts are
defined), the values stored (`measurement.py`, `decisions.py`), the SQLite store
(`cache.py`) and the checks every imported row passes (`import_checks.py`). The store
reaches no device: it reads the agent's wire values (devices.agent_result) only."""
