"""Pruning-method adapters, as plug-ins.

Adding a method is adding one module to this package that defines a `Method` subclass decorated
with `@register` (methods/registry.py); it is found here by scanning the package, so no list
names it. Methods outside the package are plug-ins too: the modules named (comma-separated) in
the `HARNESS_PLUGINS` environment variable, and those of the `pd_harness.methods` entry-point
group of installed distributions, are imported after the package's own (`load_plugins`).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from importlib.metadata import entry_points

from harness.errors import UsageError
from methods.base import Method
from methods.registry import get, names, register

__all__ = ["Method", "get", "names", "register", "load_plugins"]

ENTRY_POINT_GROUP = "pd_harness.methods"


# modules of the package that are tools, not plug-ins: `python -m methods.catalog` must be able
# to run it as __main__ without this package having imported it first (runpy warns then)
TOOLS = {"catalog"}


def _import_package_modules() -> None:
    """Import every module of this package and its sub-packages (`depth`, `kv`, `pdtrim`, ...), in
    name order, so each registers its methods."""
    infos = pkgutil.walk_packages(__path__, prefix=f"{__name__}.")
    for info in sorted(infos, key=lambda m: m.name):
        leaf = info.name.rpartition(".")[2]
        if not leaf.startswith("_") and info.name.removeprefix(f"{__name__}.") not in TOOLS:
            importlib.import_module(info.name)


def load_plugins(spec: str | None = None) -> list[str]:
    """Import external plug-in modules: `spec` (default `$HARNESS_PLUGINS`, comma-separated module
    names) and the `pd_harness.methods` entry points. Returns the modules imported; importing one
    twice is a no-op (Python caches modules), so calling this again is safe."""
    spec = os.environ.get("HARNESS_PLUGINS", "") if spec is None else spec
    loaded = []
    for mod in (m.strip() for m in spec.split(",")):
        if mod:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                hint = " (a module name, not a file path)" if "/" in mod or mod.endswith(".py") else ""
                raise PluginImportError(f"HARNESS_PLUGINS names {mod!r}, which cannot be imported: {e}; give "
                                        f"comma-separated module names importable from sys.path{hint}, e.g. add "
                                        "their folder to PYTHONPATH") from e
            loaded.append(mod)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
        loaded.append(ep.value)
    register_baselines()  # a plug-in KV policy's baseline method
    return loaded


class PluginImportError(UsageError, ImportError):
    """A `HARNESS_PLUGINS` module that cannot be imported: bad input (the CLI exits 2), and an ImportError."""


_import_package_modules()
from methods.kv.baselines import register_baselines  # noqa: E402 - imported by the scan above

load_plugins()
