"""Digests of plug-in source code, so that results made by an older version of a plug-in are not reused.

A run key names a method by its name and options, not by its code: the package's own code is named by the
git commit every record keeps. A plug-in (`HARNESS_PLUGINS`, an entry point, `methods.load_plugins`) is
edited between runs by its author, so records keep a digest of the plug-in modules a method or long-context
task runs (`harness.run.inputs.digests`: `code`), and a rerun after an edit refuses the old records (exit 2)
instead of reusing them silently. Torch-free.
"""

from __future__ import annotations

import ast
import dis
import functools
import hashlib
import importlib.machinery
import importlib.util
import site
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from types import CodeType, FunctionType

PACKAGES = frozenset({"harness", "methods", "reports"})  # the harness's own code: named by the git commit
MAIN = "__main__"  # a notebook's (or the script's) own definitions: plug-in code without a module file to digest
_ROOTS: set[str] = set()  # top-level packages (or modules) of the plug-ins imported so far
_AT_LOAD: dict[str, tuple[object, str]] = {}  # module -> (its __spec__, its file's digest as loaded): `_loaded_sha`
# a code's uses of a global name (LOAD_FROM_DICT_OR_GLOBALS: Python 3.12+, names in class bodies and annotation scopes)
GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_FROM_DICT_OR_GLOBALS"})


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
    return root in _ROOTS or _local(_file_of(module))


def _local(path: str | None) -> bool:
    """Whether a module file lies outside the standard library and installed libraries (None: built in)."""
    if not path or not Path(path).is_absolute():
        return False  # built in, or a library's synthetic module (torch.ops names a relative file)
    where = Path(path).resolve()
    return not any(where.is_relative_to(d) for d in _library_dirs())


def _file_of(module: str) -> str | None:
    """The source file of `module`, loaded or not (found without importing it); None when there is none."""
    loaded = sys.modules.get(module)
    if loaded is not None:
        return getattr(loaded, "__file__", None)
    try:
        spec = _find_spec(module)
    except (ImportError, ValueError):  # a module without a spec
        return None
    return spec.origin if spec is not None and spec.has_location else None


def _find_spec(module: str):
    """`importlib.util.find_spec` without running any code: the parent packages of a submodule not yet imported are
    looked up, not imported (`from heavy import kernel` in a function must not import `heavy` when a plug-in
    registers: an optional dependency would cost every command, and one failing at import fail the plug-in's load)."""
    parent = module.rpartition(".")[0]
    if not parent or parent in sys.modules:
        return importlib.util.find_spec(module)
    found = _find_spec(parent)
    where = found.submodule_search_locations if found is not None else None
    return importlib.machinery.PathFinder.find_spec(module, list(where)) if where else None


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
            if isinstance(value, type) and (value.__module__ == MAIN or is_plugin(value.__module__)):
                yield from _classes(value, seen)
    for value in ({} if isinstance(obj, type) else getattr(obj, "__dict__", {})).values():
        module = type(value).__module__
        if (module.split(".")[0] in PACKAGES or module == MAIN or is_plugin(module)) and not isinstance(value, (str, bytes)):
            yield from _classes(value, seen)


def _imports(module: str) -> frozenset[str]:
    """The modules `module`'s source imports, at module level or in a function (read with `ast`, not from what
    happens to be loaded): `import a.b` -> a.b; `from a import b` -> a, and a.b when that is a module; relative
    imports resolved against `module`'s package. Read once per version of the file."""
    path = _file_of(module)
    try:
        stamp = Path(path).stat() if path else None
    except OSError:
        stamp = None
    return _parsed_imports(module, path, (stamp.st_mtime_ns, stamp.st_size) if stamp else None)


@functools.lru_cache(maxsize=4096)
def _parsed_imports(module: str, path: str | None, _stamp: tuple | None) -> frozenset[str]:
    try:
        tree = ast.parse(Path(path).read_bytes()) if path and path.endswith(".py") else None
    except (OSError, SyntaxError, ValueError):
        tree = None
    package = module if path and Path(path).name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names if _file_of(f"{base}.{alias.name}")}
    return frozenset(n for n in out if n and n != module)


def plugin_classes(obj: object) -> list[type]:
    """The plug-in classes `obj` (a class or an instance) runs, outermost first (a plug-in method's class, or the
    plug-in KV policy of a package-made KV baseline); [] for the package's own."""
    return list(dict.fromkeys(c for c in _classes(obj, set()) if c.__module__ == MAIN or is_plugin(c.__module__)))


def plugin_code(obj: object) -> dict[str, str]:
    """{module name: sha256 (16 hex) of its source file} of the plug-in modules `obj` runs: those its classes come
    from, and the plug-in modules those import, transitively (a helper module of ranking functions); {} for the
    package's own methods. Classes defined in a notebook (`__main__`) are digested one by one (`main_code`)."""
    classes = list(_classes(obj, set()))
    return dict(sorted({**module_code({c.__module__ for c in classes}), **main_code(classes)}.items()))


def policy_code(plan: dict | None) -> dict[str, str]:
    """`plugin_code` of the KV policy a plan (`PruningPlan.to_dict()`) names by its kind; {} for the package's own
    policies and for a kind not registered now (its replay refuses it). A plug-in method names a plug-in policy by kind
    (`KVPolicy(kind="evens")`) without holding its class, so `plugin_code(method)` misses it: an edit of the policy
    alone went unnoticed, and the records its older code made were reused."""
    from harness.pd.kv import get_policy

    kind = ((plan or {}).get("kv_policy") or {}).get("kind") if isinstance(plan, dict) else None
    try:
        return plugin_code(get_policy(kind)) if isinstance(kind, str) else {}
    except ValueError:
        return {}


def with_policy(then: dict | None, now: dict[str, str], plan: dict | None) -> dict[str, str]:
    """`now`, a method's plug-in code digests, with those of the KV policy `plan` names (`policy_code`) where `then`,
    the digests stored with that plan, holds them: a record made before policies were digested holds none of them
    and is compared as it was."""
    extra = policy_code(plan)
    return dict(sorted({**now, **extra}.items())) if any(m in (then or {}) for m in extra) else now


def main_code(objs: list) -> dict[str, str]:
    """{"__main__.Name": digest} of the classes and functions defined in `__main__` (a notebook's cells, the script
    run) among `objs`, and of those of `__main__` their code names, transitively (a helper function in another cell),
    with the plain values (str, numbers, tuples of them) of the notebook's globals they name.
    A class's digest covers its functions' bytecode, constants and names and its plain attributes (str, numbers,
    tuples of them), not file names or line numbers, which a notebook changes each time a cell runs again."""
    todo, out, seen = [o for o in objs if getattr(o, "__module__", None) == MAIN], {}, set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        h = hashlib.sha256()
        for name, value in _members(obj):
            h.update(f"{name}:".encode())
            if isinstance(value, FunctionType):
                names = _hash_code(h, value.__code__)
                h.update(repr([_canon(v) for v in (value.__defaults__ or ()) + _closure(value) if _plain(v)]).encode())
                used = {n: value.__globals__[n] for n in sorted(names) if n in value.__globals__}
                todo += [g for g in used.values() if _is_main_def(g)]
                h.update(repr({n: _canon(g) for n, g in used.items() if _plain(g)}).encode())  # a constant (DROP = 2)
            elif _is_main_def(value):
                todo.append(value)  # a nested class (its Config): its own digest
                h.update(value.__qualname__.encode())
            else:
                h.update(repr(_canon(value)).encode())
        out[f"{MAIN}.{obj.__qualname__}"] = h.hexdigest()[:16]
    return out


def _is_main_def(value: object) -> bool:
    return isinstance(value, (type, FunctionType)) and getattr(value, "__module__", None) == MAIN


def _members(obj: object) -> Iterator[tuple[str, object]]:
    """A function itself, or a class's own functions (unwrapped), nested classes and plain attributes, by name."""
    if isinstance(obj, FunctionType):
        yield "", obj
        return
    for name, value in sorted(vars(obj).items()):
        if name in ("__firstlineno__", "__static_attributes__"):  # Python 3.13: the first moves when a line is added
            continue  # above; the second (names set on self, from the code digested) is in hash-seed order in 3.13.0
        value = getattr(value, "__func__", value)  # staticmethod, classmethod
        if isinstance(value, property):
            yield from ((f"{name}.{i}", f) for i, f in enumerate((value.fget, value.fset, value.fdel)) if f)
        elif isinstance(value, FunctionType) or _is_main_def(value) or _plain(value):
            yield name, value


def _closure(fn: FunctionType) -> tuple:
    """The values a function closes over (a class made by a function in the notebook), those set."""
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # not set yet
            pass
    return tuple(cells)


def _plain(value: object, depth: int = 0) -> bool:
    """A str, bytes, number or None, or a tuple, list, set or dict of them (a notebook's `KEEP = [0, 1]`)."""
    if depth > 8:  # deeper (or a list holding itself): not a constant
        return False
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return isinstance(value, (str, bytes, int, float, type(None)))


def _canon(value: object, depth: int = 0) -> object:
    """`value` with a repr that does not depend on the string hash seed: a set's items sorted. Only plain tuples, lists
    and dicts are rebuilt (a namedtuple's constructor takes no iterable: `P(1, 2)` as a class attribute failed the
    digest), and no deeper than `_plain` looks (a list holding itself)."""
    if depth > 8:
        return value
    if isinstance(value, (set, frozenset)):
        return (type(value).__name__, *sorted((_canon(v, depth + 1) for v in value), key=repr))
    if type(value) in (tuple, list):
        return type(value)(_canon(v, depth + 1) for v in value)
    if type(value) is dict:
        return {_canon(k, depth + 1): _canon(v, depth + 1) for k, v in value.items()}
    return value


def _hash_code(h, code: CodeType) -> set[str]:
    """Hash `code`'s bytecode, names and constants (nested code objects too) into `h`; the global names it uses: those
    it loads as globals, not every name of `co_names`, which holds attribute names too (`self.config.k` would take a
    notebook's `k = 2` for the method's code)."""
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames)).encode())
    names = {i.argval for i in dis.get_instructions(code) if i.opname in GLOBAL_OPS}
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _hash_code(h, const)
        else:  # a frozenset's order follows the string hash seed: sorted
            h.update(repr(sorted(map(repr, const)) if isinstance(const, frozenset) else const).encode())
    return names


def module_code(modules: set[str]) -> dict[str, str]:
    """`plugin_code`'s digests: the plug-in modules among `modules`, every module of their own packages that they
    import (transitively), and the local modules they import from elsewhere (a helper file or package beside
    them: the module imported, not its own imports; a library installed editable is one file, not its closure).
    What is read is the source's import statements, so the digests do not depend on what else is loaded."""
    start = {m for m in modules if is_plugin(m)}
    roots = {m.split(".")[0] for m in start}
    todo, out = set(start), {}
    while todo:
        name = todo.pop()
        path = _file_of(name)
        out[name] = _loaded_sha(name, path) if path and Path(path).is_file() else "?"
        if name.split(".")[0] not in roots:
            continue  # another package's module: itself, not what it imports
        todo |= {n for n in _imports(name) if n not in out and n.split(".")[0] not in PACKAGES
                 and not n.startswith("__") and (n.split(".")[0] in roots or _local(_file_of(n)))}
    return dict(sorted(out.items()))


def _loaded_sha(name: str, path: str) -> str:
    """The digest of the source module `name` runs: of its file when the module was first digested after each import
    or `importlib.reload` (each gives it a new `__spec__`; `note_loaded` digests it as it loads), so a file edited on
    disk but not reloaded (a notebook) is not taken for the code that runs; the file's digest now when not loaded."""
    spec = getattr(sys.modules.get(name), "__spec__", None)
    if spec is None:
        return _file_sha(path)
    seen = _AT_LOAD.get(name)
    if seen is None or seen[0] is not spec:
        seen = _AT_LOAD[name] = (spec, _file_sha(path))
    return seen[1]


def note_loaded(module: str) -> None:
    """Digest the plug-in code of `module` as it is loaded (a plug-in registering a class, `load_plugins`)."""
    module_code({module})


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
