"""Pruning-method adapters, as plug-ins.

Adding a method is adding one module to this package that defines a `Method` subclass decorated
with `@register` (methods/registry.py); it is found here by scanning the package, so no list
names it. Methods outside the package are plug-ins too: the modules named (comma-separated) in
the `HARNESS_PLUGINS` environment variable, and those of the `pd_harness.methods` entry-point
group of installed distributions, are imported after the package's own (`load_plugins`).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

from harness.errors import UsageError
from harness.registration import module_names
from methods import plugin_code
from methods.base import Method
from methods.registry import get, names, register

__all__ = ["Method", "get", "names", "register", "load_plugins", "plugin_modules"]

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


_LOADED: dict[str, None] = {}  # every plug-in module load_plugins imported, in load order (`plugin_modules`)


def load_plugins(spec: str | None = None, source: str = "HARNESS_PLUGINS") -> list[str]:
    """Import external plug-in modules: `spec` (default `$HARNESS_PLUGINS`, comma-separated module
    names) and the `pd_harness.methods` entry points. Returns the modules imported; importing one
    twice is a no-op (Python caches modules), so calling this again is safe. `source` is what named
    `spec`, for the error of a module that cannot be imported (a spec's `plugins` key)."""
    loaded = []
    for mod in module_names(spec):
        plugin_code.note_plugin(mod)  # its records keep digests of its code (methods/plugin_code.py)
        _import_plugin(mod, f"{source} names {mod!r}", functools.partial(importlib.import_module, mod))
        plugin_code.note_loaded(mod)  # its KV policies' and tasks' code as loaded (methods register their own)
        loaded.append(mod)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        plugin_code.note_plugin(ep.value)
        _import_plugin(ep.value, f"the entry point {ep.name} = {ep.value!r} (group {ENTRY_POINT_GROUP})", ep.load)
        loaded.append(ep.value)
    _LOADED.update(dict.fromkeys(loaded))
    _import_plugin("", "the KV-baseline method of a plug-in KV policy", register_baselines)
    _refuse_shared_names()
    return loaded


def plugin_modules() -> list[str]:
    """The plug-in modules imported so far, in load order, each once: those `HARNESS_PLUGINS`, a spec's `plugins` or a
    `load_plugins` call named, and the entry points' values (`module:attr`). What a record keeps as the plug-ins its run
    loaded (`environment.plugins`); a module since dropped from `sys.modules` (a test's) is left out."""
    return [m for m in _LOADED if m.partition(":")[0] in sys.modules]


def _refuse_shared_names() -> None:
    """A method and a long-context task of one name: `--set NAME.OPTION` would set only one of them."""
    from harness.quality import long_tasks

    both = sorted(set(names()) & set(long_tasks.names()))
    if both:
        owners = "; ".join(f"{n}: method {get(n).__module__}, task {long_tasks.get(n).__module__}" for n in both)
        raise PluginImportError(f"{', '.join(repr(n) for n in both)} is both a method and a long-context task ({owners}); "
                                "--set NAME.OPTION could not tell them apart: rename the plug-in's")


def _import_plugin(mod: str, what: str, load) -> None:
    """Run `load`; a plug-in that cannot be imported, raises while importing, or registers a name that is
    taken is bad input (PluginImportError: the CLI exits 2 naming it), not a traceback in every command."""
    try:
        load()
    except UsageError:
        raise
    except ImportError as e:
        if not _not_found(e, mod):  # an import inside the plug-in failed: its own code or a dependency, not the path
            raise PluginImportError(f"{what}, which failed to load: {type(e).__name__}: {e}{_where(e)}; install what it "
                                    "imports, or fix the import in the plug-in") from e
        hint = _file_hint(mod) if "/" in mod or "\\" in mod or mod.endswith(".py") else ""
        raise PluginImportError(f"{what}, which cannot be imported: {e}; give module names importable from "
                                f"sys.path{hint}, e.g. add their folder to PYTHONPATH") from e
    except Exception as e:  # noqa: BLE001 - any error of a plug-in's own code, named with its module
        raise PluginImportError(f"{what}, which failed to load: {type(e).__name__}: {e}{_where(e)}; fix the plug-in, or "
                                "leave it out (HARNESS_PLUGINS, or uninstall its distribution)") from e


def _not_found(e: ImportError, mod: str) -> bool:
    """Whether `e` says the plug-in module `mod` itself (or its package) is not there, rather than that an import
    inside it failed (a missing dependency, a misspelt name: PYTHONPATH advice sent its author the wrong way)."""
    target = mod.split(":")[0]
    return isinstance(e, ModuleNotFoundError) and bool(e.name) and (target == e.name or target.startswith(e.name + "."))


def _where(e: BaseException) -> str:
    """' (at FILE:LINE)': the last line outside the harness's own packages that the error passed through (the plug-in's
    raise, its import statement, its decorator line); '' when there is none (a SyntaxError names its line itself)."""
    import traceback

    root = Path(__file__).resolve().parent.parent
    own = [root / p for p in ("harness", "methods", "reports")]
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<")
              and not any(Path(f.filename).resolve().is_relative_to(d) for d in own)]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _file_hint(path: str) -> str:
    """What to give for a plug-in file path: its module name, with its folder on PYTHONPATH ('my_plugins/my_sciq.py'
    -> 'my_sciq' with my_plugins on PYTHONPATH)."""
    file = Path(path.replace("\\", "/"))
    return f" (a module name, not a file path: {file.name.removesuffix('.py')!r} with {str(file.parent)!r} on PYTHONPATH)"


class PluginImportError(UsageError, ImportError):
    """A `HARNESS_PLUGINS` module that cannot be imported: bad input (the CLI exits 2), and an ImportError."""


_import_package_modules()
from methods.kv.baselines import register_baselines  # noqa: E402 - imported by the scan above

load_plugins()
