"""A spec's top-level `plugins` key: the plug-in modules its methods, tasks and figures come from.

    plugins = ["my_plugins.kv", "my_plugins.tasks"]   # above the first [section]: TOML puts later keys in it

The same rules as `HARNESS_PLUGINS` (module names importable from `sys.path`, not file paths), and the two
combine: `HARNESS_PLUGINS`'s modules are imported first (`import methods` does it), then the spec's, each module
once, at its first place (`combined`). A spec that names its plug-ins reproduces its run without the variable;
`sweep` hands the combined list to every cell as `HARNESS_PLUGINS`, and records keep the modules a run loaded
(`environment.plugins`, harness/run/env.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import UsageError
from harness.registration import module_names

KEY = "plugins"
EXAMPLE = 'plugins = ["my_plugins.kv"]'


def parse(path: Path, value: Any) -> tuple[str, ...]:
    """The module names of a spec's `plugins` value: a list of module names, or one string of comma-separated
    names as `HARNESS_PLUGINS` takes them. Anything else, a file path or a name Python cannot import as a module
    is a UsageError naming the key."""
    where = f"{path} {KEY}"
    if isinstance(value, str):
        value = module_names(value)
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise UsageError(f"{where}: expected a list of module names in quotes, e.g. {EXAMPLE}, got {value!r}")
    names = []
    for m in (m.strip() for m in value):
        if "/" in m or "\\" in m or m.endswith(".py"):
            raise UsageError(f"{where}: {m!r} is a file path; give module names importable from sys.path, e.g. "
                             f"{EXAMPLE} with the folder holding my_plugins on PYTHONPATH (as HARNESS_PLUGINS takes them)")
        if not m or not all(part.isidentifier() for part in m.split(".")):
            raise UsageError(f"{where}: {m!r} is not a module name; give dotted Python names, e.g. {EXAMPLE}")
        names.append(m)
    return tuple(names)


def combined(spec_plugins: Sequence[str]) -> list[str]:
    """`HARNESS_PLUGINS`'s modules, then `spec_plugins`, each once at its first place: the order they are imported."""
    return list(dict.fromkeys([*module_names(), *spec_plugins]))


def load(path: Path, spec_plugins: Sequence[str]) -> None:
    """Import the spec's plug-in modules, after `HARNESS_PLUGINS`'s (`import methods` imports those), before any of
    the spec's method, task or figure names is resolved. One that cannot be imported exits 2 naming the spec."""
    if not spec_plugins:
        return  # a spec without plug-ins imports nothing here (a [report]-only spec needs no torch)
    import methods

    methods.load_plugins()  # HARNESS_PLUGINS's first, also where `methods` was imported before the variable was set
    methods.load_plugins(",".join(spec_plugins), source=f"{path} {KEY}")
