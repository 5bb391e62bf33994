"""Where measurements run: the DevicePool protocol and its values, the pool of this host's
devices with its job board (`device_pool.py`), exclusive leases and health (`leases.py`),
a Ray farm's pool and host actors (`ray_pool.py`), a farm host's life (`farm.py`), and
which pool a profiler opens (`pools.py`)."""
