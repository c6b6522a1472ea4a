"""Digests of plug-in source code, so that results made by an older version of a plug-in are not reused.

A run key names a method by its name and options, not by its code: the package's own code is named by the
git commit every record keeps. A plug-in (`HARNESS_PLUGINS`, an entry point, `methods.load_plugins`) is
edited between runs by its author, so records keep a digest of the plug-in modules a method or long-context
task runs (`harness.run.inputs.digests`: `code`), and a rerun after an edit refuses the old records (exit 2)
instead of reusing them silently. Torch-free.
"""

from __future__ import annotations

import functools
import hashlib
import site
import sys
import sysconfig
import types
from collections.abc import Iterator
from pathlib import Path

PACKAGES = frozenset({"harness", "methods", "reports"})  # the harness's own code: named by the git commit
_ROOTS: set[str] = set()  # top-level packages (or modules) of the plug-ins imported so far


def note_plugin(module: str) -> None:
    """Count the modules of `module`'s top-level package as plug-in code (e.g. `my_plugins.kv` -> `my_plugins`), also
    when it is installed among the libraries."""
    root = module.split(":")[0].split(".")[0]
    if root and root not in PACKAGES:
        _ROOTS.add(root)


@functools.cache
def _library_dirs() -> tuple[Path, ...]:
    """Where the standard library and installed distributions live."""
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs |= set(getattr(site, "getsitepackages", list)()) | {site.getusersitepackages()}
    return tuple(Path(d).resolve() for d in dirs if d)


def is_plugin(module: str) -> bool:
    """Whether `module` is plug-in code: of a plug-in's package, or any module that is neither the harness's, nor the
    standard library's, nor an installed library's (a plug-in's own helper module on PYTHONPATH counts, whichever
    modules HARNESS_PLUGINS names)."""
    root = module.split(".")[0]
    if root in PACKAGES or root.startswith("__"):  # __main__ (python -m harness), __mp_main__
        return False
    if root in _ROOTS:
        return True
    path = getattr(sys.modules.get(module), "__file__", None)
    if not path or not Path(path).is_absolute():
        return False  # built in, or a library's synthetic module (torch.ops names a relative file)
    where = Path(path).resolve()
    return not any(where.is_relative_to(d) for d in _library_dirs())


def _classes(obj: object, seen: set[int]) -> Iterator[type]:
    """The classes `obj` (a class or an instance) runs: its MRO, classes held as class attributes (a KV baseline's
    `policy_cls`), and, for an instance, the same for the objects of the package's kinds it holds (a wrapper's
    inner method)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    cls = obj if isinstance(obj, type) else type(obj)
    for c in cls.__mro__:
        yield c
        for value in vars(c).values():
            if isinstance(value, type) and is_plugin(value.__module__):
                yield from _classes(value, seen)
    for value in ({} if isinstance(obj, type) else getattr(obj, "__dict__", {})).values():
        module = type(value).__module__
        if (module.split(".")[0] in PACKAGES or is_plugin(module)) and not isinstance(value, (str, bytes)):
            yield from _classes(value, seen)


def _imports(module: str) -> set[str]:
    """The plug-in modules `module` uses at module level and that are followed (`_followed`): the modules it
    imported, those of the functions and classes it imported (`from my_helpers import order`), and for an imported
    package, the submodules its source names (`import pkg.helpers`, used as `pkg.helpers.order`)."""
    mod = sys.modules.get(module)
    out = set()
    for value in vars(mod or object()).values():
        if isinstance(value, types.ModuleType) and hasattr(value, "__path__"):  # a package: what is named of it only
            text = _source(mod)
            out |= {n for n in list(sys.modules) if n.startswith(value.__name__ + ".") and n in text}
            continue
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None) \
            if isinstance(value, (type, types.FunctionType)) else None
        if isinstance(name, str):
            out.add(name)
    return {n for n in out if n != module and is_plugin(n) and _followed(module, n)}


def _followed(importer: str, module: str) -> bool:
    """Whether a plug-in's import of `module` counts as its code: a module of its own package, of a named plug-in,
    or a lone top-level module (a helper file beside it); not a whole library that merely lies outside site-packages
    (an editable install), whose updates are not the plug-in's edits."""
    root = module.split(".")[0]
    return root == importer.split(".")[0] or root in _ROOTS or ("." not in module and not hasattr(sys.modules.get(module), "__path__"))


def _source(module) -> str:
    path = getattr(module, "__file__", None)
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace") if path else ""
    except OSError:
        return ""


def plugin_code(obj: object) -> dict[str, str]:
    """{module name: sha256 (16 hex) of its source file} of the plug-in modules `obj` runs: those its classes come
    from, and the plug-in modules those import, transitively (a helper module of ranking functions); {} for the
    package's own methods."""
    return module_code({c.__module__ for c in _classes(obj, set())})


def module_code(modules: set[str]) -> dict[str, str]:
    """`plugin_code`'s digests for the plug-in modules among `modules` and the plug-in modules they import."""
    todo = {m for m in modules if is_plugin(m)}
    out: dict[str, str] = {}
    while todo:
        name = todo.pop()
        path = getattr(sys.modules.get(name), "__file__", None)
        out[name] = _file_sha(path) if path and Path(path).is_file() else "?"
        todo |= _imports(name) - set(out)
    return dict(sorted(out.items()))


def _file_sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def code_digest(obj: object) -> str:
    """One string for `plugin_code(obj)` ("" for the package's own): for cache keys (rankings) that must change
    with a plug-in's code."""
    return ",".join(f"{m}:{d}" for m, d in plugin_code(obj).items())


def changes(then: dict[str, str] | None, now: dict[str, str] | None) -> list[str]:
    """The modules whose digest differs between `then` and `now` (added or dropped ones too)."""
    then, now = then or {}, now or {}
    return sorted(m for m in set(then) | set(now) if then.get(m) != now.get(m))
