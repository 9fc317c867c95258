"""pyroute2 submodules, loaded without the package's ``__init__``.

``import pyroute2`` (or of any of its submodules) first runs the package's
``__init__``, which scans the entry points of every installed distribution
and imports the library's whole API: over 100 ms, at every boot that
brings up an interface or adds a route.  The submodules we use need nothing
from it.  So while they load, an empty package module stands in for the
real one; it is removed again afterwards, so that a later ``import
pyroute2`` anywhere in the process still gets the real package.  Should
this ever fail with another pyroute2 version, the ordinary import is used.
"""

import importlib
import sys
from types import ModuleType


def load(name: str) -> ModuleType:
    """The pyroute2 submodule ``name`` (such as ``"pyroute2.iproute.linux"``)."""
    if name in sys.modules:
        return sys.modules[name]
    if "pyroute2" not in sys.modules:
        import importlib.machinery
        spec = importlib.machinery.PathFinder.find_spec("pyroute2")
        if spec is not None and spec.submodule_search_locations:
            package = ModuleType("pyroute2")
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__ = spec
            package.__file__ = spec.origin
            sys.modules["pyroute2"] = package
            try:
                return importlib.import_module(name)
            except Exception:  # noqa: BLE001 - fall back to the ordinary import
                for loaded in [m for m in sys.modules if m.startswith("pyroute2.")]:
                    del sys.modules[loaded]
            finally:
                if sys.modules.get("pyroute2") is package:
                    del sys.modules["pyroute2"]
    return importlib.import_module(name)
