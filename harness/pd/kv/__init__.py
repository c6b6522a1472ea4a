"""KV policies of the prefill->decode handoff, as plug-ins.

Each policy is one module of this package defining a `KVPolicy` subclass (`harness.pd.kv.base`)
decorated with `register_policy`; every module here is imported when the package is, so a new
file registers itself with no edit elsewhere. A plan stores its policy's `to_dict()` (the name
under `kind`, absent for `first_last`) and `policy_from_dict` reads it back. The engine, the
observer of the prefill attention, the reports, the export manifest and the KV-baseline methods
ask the policy object; none of them switches on a name.

Torch-free at import time (reports read stored plans without torch): policies import torch
inside the functions that compute masks.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from harness.registration import check_callable_as, check_name, same_definition

_POLICIES: dict[str, type] = {}


def register_policy(cls: type) -> type:
    """Class decorator: make the policy class `cls` available under `cls.name`."""
    check_name("KV policy", getattr(cls, "name", None), f"{cls.__module__}.{cls.__qualname__}")
    if inspect.isabstract(cls):  # else accepted, then a traceback ("Can't instantiate abstract class") in every cell
        raise ValueError(f"KV policy {cls.name!r}: does not define {', '.join(sorted(cls.__abstractmethods__))} "
                         "(see harness/pd/kv/base.py)")
    check_callable_as(f"KV policy {cls.name!r} ({cls.__module__}.{cls.__qualname__})", cls.keep,
                      "keep(self, layer, positions, lengths, k, observed)", cls)
    old = _POLICIES.get(cls.name)
    if old is not None and old is not cls and not same_definition(old, cls):
        raise ValueError(f"KV policy {cls.name!r} defined twice: {old.__module__}, {cls.__module__}")  # a re-import replaces
    _POLICIES[cls.name] = cls
    return cls


def get_policy(name: str) -> type:
    """The policy class registered under `name` (ValueError naming the known ones otherwise)."""
    if name not in _POLICIES:
        raise ValueError(f"KVPolicy.kind must be one of {tuple(policy_names())}, got {name!r}")
    return _POLICIES[name]


def policy_names() -> list[str]:
    """Registered policy names, `first_last` (the default) first, then alphabetical."""
    return sorted(_POLICIES, key=lambda n: (n != "first_last", n))


def policy_from_dict(d: dict[str, Any]):
    """A policy from its `to_dict()` form; no `kind` key means `first_last` (the pre-plug-in layout)."""
    return get_policy(d.get("kind", "first_last")).from_dict(d)


def _import_plugins() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


from harness.pd.kv.base import KVBudget, KVPolicy, Observation, TokenSelection  # noqa: E402

_import_plugins()

__all__ = ["KVBudget", "KVPolicy", "Observation", "TokenSelection", "get_policy", "policy_from_dict", "policy_names",
           "register_policy"]
