"""What the plug-in registries (methods, KV policies, long-context tasks, latency figures) check when something
registers: its Config's option types, read then (a type the annotations cannot resolve, imported only under
TYPE_CHECKING, is named then rather than breaking `--help` and every run with a NameError), and whether a name
already taken is the same definition imported again (`importlib.reload` of an edited plug-in replaces it); and what
the task registries share: a name -> class table and the import of every module of a plug-in package. Imports
nothing of the harness (the registries at every layer use it)."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import typing
from pathlib import Path
from typing import Any

# A registered name is a file name (`<method>__<mode>.json`), an item of a comma-separated --methods/--tasks list and
# the scope of `--set NAME.OPTION=`: letters, digits, '_', '-' and '+', starting with a letter or digit, <= 64 long.
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]{0,63}")
NAME_TEXT = ("1-64 letters, digits, '_', '-' or '+', starting with a letter or digit (it names record files, "
             "--methods/--tasks items and --set scopes)")
# An lm-eval task on local data is named as lm-eval names its tasks (its hub task without --data-dir): no record file
# and no --set scope, but an item of --tasks and the generated YAML's file name. Every name lm-eval 0.4.13 defines
# fits (`bertaqa_en_mt_latxa-7b-v1.1`, `egymmlu_arabic_language_(general)`, 86 characters at the most).
LM_EVAL_NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+().-]{0,199}")
LM_EVAL_NAME_TEXT = ("1-200 letters, digits, '_', '-', '+', '.', '(' or ')', starting with a letter or digit (as lm-eval "
                     "names its tasks; it is a --tasks item and a file name)")


def check_name(kind: str, name: object, owner: str, rule: re.Pattern = NAME_RULE, text: str = NAME_TEXT) -> None:
    """A ValueError naming `owner` (the class) when `name` cannot serve as a registered `kind`'s name: a '/' made the
    record a file in a sub-folder, a ',' or a space a method `--methods` could not select, a '.' a `--set` scope.
    `rule` and `text`: another kind's rule and its wording (`LM_EVAL_NAME_RULE`)."""
    if not isinstance(name, str) or not rule.fullmatch(name):
        raise ValueError(f"{owner}: {kind} name {name!r} is not usable; a name is {text}")


def module_names(text: str | None = None) -> list[str]:
    """The plug-in module names of a comma-separated list as `HARNESS_PLUGINS` takes it (`text`; default: the
    variable), in order, blanks dropped."""
    text = os.environ.get("HARNESS_PLUGINS", "") if text is None else text
    return [m for m in (m.strip() for m in text.split(",")) if m]


def option_types(cls_config: type, owner: str) -> dict[str, Any]:
    """The option types of the options dataclass `cls_config`, as `--set` and `--help` read them; a ValueError naming
    `owner` when they cannot be read. (`--set` gives int, float, str, bool, tuples of those and `X | None`; an option
    of another type keeps its default and `--set` on it says so.)"""
    try:
        return typing.get_type_hints(cls_config)
    except Exception as e:  # noqa: BLE001 - NameError and friends from the plug-in's annotations
        raise ValueError(f"{owner}: the types of its Config options cannot be read ({type(e).__name__}: {e}); import "
                         "every type an option names at module level, not under TYPE_CHECKING") from None


def check_callable_as(owner: str, fn: Any, call: str, holder: type | None = None) -> None:
    """A ValueError naming `owner` when `fn` cannot take the positional arguments the harness gives it, `call` (as
    "plan(self, model, calib, mode)"). With `holder`, `fn` is its attribute of that name: the first argument (self or
    cls) is given by Python unless it is a plain function. A `plan(self, model, mode)` was registered, then failed every
    cell with "takes 3 positional arguments but 4 were given" (exit 1, "rerun to retry") once the model had loaded,
    naming neither the plug-in nor the signature it needs."""
    name, args = call[:call.index("(")], call[call.index("(") + 1:-1].split(", ")
    if holder is not None and isinstance(inspect.getattr_static(holder, name, None), (staticmethod, classmethod)):
        args = args[1:]
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a callable whose signature Python cannot read (a builtin): the call will tell
        return
    try:
        signature.bind(*args)
    except TypeError as e:
        raise ValueError(f"{owner}: {name}{signature} cannot be called as {call} ({e}); give it that signature") from None


def same_definition(old: Any, new: Any) -> bool:
    """Whether `new` (a class or function) is `old` defined again by a fresh import of its module: the same module
    and qualified name."""
    return (old.__module__, old.__qualname__) == (new.__module__, new.__qualname__)


def import_package_modules(package: str, folder: str | Path, builtin: tuple[str, ...] = ()) -> None:
    """Import every module of a plug-in package (`folder` holds `package`), except `base` and `_private` ones: those
    named in `builtin` first, in that order, then the others by name (the order their registrations take)."""
    found = [m.name for m in pkgutil.iter_modules([str(folder)]) if m.name != "base" and not m.name.startswith("_")]
    for mod in [*(b for b in builtin if b in found), *sorted(set(found) - set(builtin))]:
        importlib.import_module(f"{package}.{mod}")


class TaskRegistry(dict):
    """Task classes by name, in registration order (the built-in tasks are imported first)."""

    def names(self) -> tuple[str, ...]:
        """Registered task names: the built-in ones first, then the others in registration order."""
        return tuple(self)

    def task(self, name: str) -> Any:
        """The task class (KeyError for an unknown name)."""
        return self[name]

    def forget(self, name: str) -> None:
        """Forget a task (tests register throwaway tasks)."""
        self.pop(name, None)
