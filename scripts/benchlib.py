"""What the benchmarks share: the repository on sys.path, and the test farm loaded as a module
(scripts/testfarm is a command without a .py suffix)."""
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_testfarm() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("testfarm", str(ROOT / "scripts" / "testfarm"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("testfarm", loader))
    loader.exec_module(module)
    return module
