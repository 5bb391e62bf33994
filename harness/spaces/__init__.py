"""Model spaces: the protocol a space follows (`space.py`: search_space, freeze, sampling,
the NNI adapter), additive spaces summed per block (`additive.py`), and the built-in spaces
users name on the command line (`harness.spaces:ProxylessSpace`, `builtin.py`, `mixed.py`).
A space describes architectures; it knows no profiler."""
from harness.spaces.builtin import MBConv, MobileSpace, ProxylessSpace, TinySpace

__all__ = ["MBConv", "MobileSpace", "ProxylessSpace", "TinySpace"]
