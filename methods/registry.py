"""Registry of method classes (classes, not instances: each run builds its own), and of wrappers.

A *method* registers itself with `@register` in its own module; `methods/__init__.py` imports
every module of the package (and the plug-ins named by `HARNESS_PLUGINS` or the
`pd_harness.methods` entry-point group), so a new file is all a new method needs.

A *wrapper* is a family of methods made from a registered base method, named `<prefix><base>`
(e.g. `stage:sleb`, methods/depth/stage.py). A wrapper module registers a `Wrapper` with
`register_wrapper`; `get` resolves a prefixed name through it and caches the class it builds.
This module imports no wrapper module, so there is no registry <-> wrapper import cycle: the
wrapper imports the registry, never the other way round. Wrappers that take their base as an
option (`streamingllm`, `snapkv`: `base=pdtrim`) build it with `instantiate`, so every wrapper
builds its inner method the same way and its errors name the wrapper.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from harness.errors import UsageError
from harness.registration import check_callable_as, check_name, option_types, same_definition
from methods import plugin_code
from methods.base import Method

_METHODS: dict[str, type[Method]] = {}
_WRAPPERS: dict[str, Wrapper] = {}
_BUILT: dict[tuple[str, type[Method]], type[Method]] = {}  # (prefix, base class) -> wrapper class


@dataclass(frozen=True)
class Wrapper:
    """A family `<prefix><base>` of methods wrapped around registered base methods.

    `supports(base_cls)`: whether `base_cls` has a variant. `build(base_cls)`: the variant's class
    (called once per base; `get` caches it). `why_not(base_cls)`: why a base has none (for the
    error). `title`: what one member is called in messages ("stage-aware variant").
    `doc_row(bases)`: the family's row of docs/methods.md's methods table (prefill, decode, KV), given
    the bases that have a variant (methods/catalog.py).
    """

    prefix: str
    supports: Callable[[type[Method]], bool]
    build: Callable[[type[Method]], type[Method]]
    why_not: Callable[[type[Method]], str]
    title: str
    doc_row: Callable[[list[str]], tuple[str, str, str]] | None = None


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available under `cls.name`."""
    name = getattr(cls, "name", None)
    if isinstance(name, str) and any(name.startswith(p) for p in _WRAPPERS):  # before the name rule: the clearer word
        raise ValueError(f"method {name!r}: names starting with a wrapper prefix ({', '.join(_WRAPPERS)}) are reserved")
    check_name("method", name, f"{cls.__module__}.{cls.__qualname__}")
    old = _METHODS.get(cls.name)
    if old is not None and old is not cls:
        if not same_definition(old, cls):
            raise ValueError(f"method {cls.name!r} defined twice: {old.__module__}, {cls.__module__}")
        unregister(cls.name)  # its module imported again (importlib.reload of an edited plug-in): the new class
    if not (isinstance(cls.Config, type) and dataclasses.is_dataclass(cls.Config)):  # --set, --help and specs read its fields
        raise ValueError(f"method {cls.name!r}: its Config must be a dataclass (@dataclass(frozen=True) class "
                         f"Config(Options): ...), got {cls.Config!r}")
    option_types(cls.Config, f"method {cls.name!r}")  # --set and --help read them: unreadable ones fail here, named
    missing = [f.name for f in dataclasses.fields(cls.Config)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:  # a run that sets none of its options builds Config()
        raise ValueError(f"method {cls.name!r}: every Config option needs a default; {', '.join(missing)} has none")
    if inspect.isabstract(cls):  # else accepted, then a traceback ("Can't instantiate abstract class") in every cell
        raise ValueError(f"method {cls.name!r}: does not define {', '.join(sorted(cls.__abstractmethods__))} (a method's "
                         "plan(model, calib, mode) returns its PruningPlan)")
    check_callable_as(f"method {cls.name!r} ({cls.__module__}.{cls.__qualname__})", cls.plan,
                      "plan(self, model, calib, mode)", cls)
    _METHODS[cls.name] = cls
    plugin_code.note_loaded(cls.__module__)  # the code that runs, not a later edit of its file (methods/plugin_code.py)
    return cls


def unregister(name: str) -> None:
    """Forget method `name` and the wrapper classes built around it (plug-in tests clean up with this)."""
    cls = _METHODS.pop(name)
    for key in [k for k in _BUILT if k[1] is cls]:
        del _BUILT[key]


def register_wrapper(wrapper: Wrapper) -> Wrapper:
    """Make `<wrapper.prefix><base>` resolvable for every base that `wrapper.supports`."""
    if wrapper.prefix in _WRAPPERS and _WRAPPERS[wrapper.prefix] != wrapper:
        raise ValueError(f"wrapper prefix {wrapper.prefix!r} registered twice")
    _WRAPPERS[wrapper.prefix] = wrapper
    return wrapper


def registered(name: str) -> type[Method] | None:
    """The class registered under exactly `name` (no wrapper resolution), or None."""
    return _METHODS.get(name)


def get(name: str) -> type[Method]:
    """The class of method `name` (a registered name or `<prefix><base>`); UsageError when unknown."""
    if name in _METHODS:
        return _METHODS[name]
    for prefix, wrapper in _WRAPPERS.items():
        base = _METHODS.get(name[len(prefix):]) if name.startswith(prefix) else None
        if base is None:
            continue
        if not wrapper.supports(base):
            raise UsageError(f"no {wrapper.title} {name!r}: {wrapper.why_not(base)}; {wrapper.title}s exist for "
                             f"{', '.join(prefix + b for b in bases_of(prefix))}")
        if (prefix, base) not in _BUILT:
            _BUILT[prefix, base] = wrapper.build(base)
        return _BUILT[prefix, base]
    near = difflib.get_close_matches(name, names(), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    families = "".join(f"; {w.title}s: {', '.join(p + b for b in bases_of(p))}" for p, w in sorted(_WRAPPERS.items()))
    raise UsageError(f"unknown method {name!r}{hint}; known methods: {', '.join(sorted(_METHODS))}{families} (a plug-in's "
                     "method: name its module in HARNESS_PLUGINS or a spec's top-level plugins key)")


def instantiate(owner: str, base: str | type[Method], options: Mapping[str, Any] | Any = None) -> Method:
    """The inner method a wrapper `owner` runs: `base` (a name or class) with `options`, either its
    Config's fields (defaults for the rest) or a Config instance (e.g. from `build_options`). An
    invalid option is a UsageError that names `owner` first."""
    cls = get(base) if isinstance(base, str) else base
    try:
        config = options if isinstance(options, cls.Config) else cls.Config(**dict(options or {}))
        return cls(config)
    except UsageError as e:
        raise UsageError(f"{owner}: {e}") from None


def bases_of(prefix: str) -> list[str]:
    """Registered methods that have a `<prefix>` variant, sorted."""
    wrapper = _WRAPPERS.get(prefix)
    return [n for n in sorted(_METHODS) if wrapper is not None and wrapper.supports(_METHODS[n])]


def stage_bases() -> list[str]:
    """Registered methods that have a `stage:` variant (methods/depth/stage.py)."""
    return bases_of("stage:")


def wrappers() -> list[Wrapper]:
    """The registered wrapper families, by prefix."""
    return [_WRAPPERS[p] for p in sorted(_WRAPPERS)]


def names() -> list[str]:
    """Every method name: the registered ones, then each wrapper family's variants."""
    return sorted(_METHODS) + [w.prefix + b for w in wrappers() for b in bases_of(w.prefix)]
