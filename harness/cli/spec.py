"""Experiment specs: TOML files under `configs/` that regenerate a table.

    [run]       # optional: a quality run; keys are `python -m harness` flags (dashes or underscores)
    methods = ["unpruned", "shortgpt"]
    tasks = ["standard", "long"]
    set = ["shortgpt.k=8"]          # repeated --set
    out = "results/runs/main"        # finished records there are reused (the run resumes)

    [latency]   # optional: a latency run; keys are `python -m harness latency` flags
    plans_from = "run"               # "run" = the [run] section's out folder
    prompt_tokens = [512, 2048]

    [report]    # what `python -m harness report` renders from the two outs (or `results = [...]`)
    out = "reports/out/main"

Each section is turned into the argument list of its command and parsed by that command's own
parser, so a spec accepts exactly what the command line accepts, with the same checks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UsageError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

SECTIONS = ("run", "latency", "report")


@dataclass
class Spec:
    path: Path
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def out(self, section: str) -> Path | None:
        v = self.sections.get(section, {}).get("out")
        return Path(v) if v else None


def load_spec(path: str | Path) -> Spec:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--config {p}: no such file (specs live in configs/, e.g. configs/ci.toml)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"--config {p}: not a readable TOML file ({e})") from None
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise UsageError(f"{p}: unknown section(s) {', '.join(unknown)}; a spec has [run], [latency] and/or [report]")
    bad = [k for k in data if not isinstance(data[k], dict)]
    if bad:
        raise UsageError(f"{p}: {', '.join(bad)} must be a [section] table")
    if "run" not in data and "latency" not in data and not data.get("report", {}).get("results"):
        raise UsageError(f"{p}: nothing to do; give a [run] or [latency] section, or [report] results = [folders]")
    return Spec(p, {k: dict(v) for k, v in data.items()})


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}


def _spec_key(action: argparse.Action) -> str:
    """The key a spec uses for a flag: its long name with underscores (`--set` -> set, `--plans-from` -> plans_from)."""
    return max(action.option_strings, key=len).lstrip("-").replace("-", "_")


def to_argv(spec: Spec, section: str, parser: argparse.ArgumentParser, replace: dict[str, Any] | None = None) -> list[str]:
    """The command-line arguments equivalent to `[section]` (after `replace`), checked against `parser`."""
    values = {k.replace("-", "_"): v for k, v in spec.sections[section].items()}
    values.update(replace or {})
    # spec keys are the flags' names (`set` for --set); `config` would nest a spec in a spec, `help` prints and exits
    actions = {_spec_key(a): a for dest, a in _flags(parser).items() if dest not in ("help", "config")}
    argv: list[str] = []
    for key, v in values.items():
        act = actions.get(key)
        if act is None:
            why = " (a spec cannot name another spec)" if key == "config" else ""
            raise UsageError(f"{spec.path} [{section}]: unknown key {key!r}{why}; known keys: {', '.join(sorted(actions))}")
        flag = max(act.option_strings, key=len)
        if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(v, bool):
                raise UsageError(f"{spec.path} [{section}]: {key} must be true or false, got {v!r}")
            if v == isinstance(act, argparse._StoreTrueAction):
                argv.append(flag)
        elif isinstance(act, argparse._AppendAction):
            for item in v if isinstance(v, list) else [v]:
                argv += [flag, str(item)]
        elif isinstance(v, list):
            argv += [flag, ",".join(str(x) for x in v)]
        elif isinstance(v, (dict, bool)):
            raise UsageError(f"{spec.path} [{section}]: {key} must be a number, a string or a list, got {v!r}")
        else:
            argv += [flag, str(v)]
    return argv


def run_spec(spec: Spec, commands: dict, outs: dict[str, Path] | None = None) -> int:
    """Run the spec's sections in order (run, latency, report) through the CLI's own commands.

    `outs` replaces the sections' `out` folders (the regression check reruns into a fresh folder)."""
    from harness.cli.latency import latency_parser
    from harness.cli.report import report_parser
    from harness.cli.run import run_parser

    outs = outs or {}
    parsers = {"run": run_parser, "latency": latency_parser, "report": report_parser}
    resolved = {s: outs.get(s) or spec.out(s) for s in ("run", "latency")}
    for s in ("run", "latency"):
        if s in spec.sections and resolved[s] is None:
            raise UsageError(f"{spec.path} [{s}]: give out = \"<folder>\" so a rerun resumes its finished records")
    for section in ("run", "latency"):
        if section not in spec.sections:
            continue
        replace: dict[str, Any] = {"out": str(resolved[section])}
        if section == "latency" and spec.sections[section].get("plans_from") == "run":
            if resolved["run"] is None:
                raise UsageError(f"{spec.path} [latency]: plans_from = \"run\" needs a [run] section")
            replace["plans_from"] = str(resolved["run"])
        argv = to_argv(spec, section, parsers[section](), replace)
        rc = commands[section](argv)
        if rc != 0:
            return rc
    if "report" in spec.sections and "report" in commands:
        rep = dict(spec.sections["report"])
        inputs = [str(resolved[s]) for s in ("run", "latency") if s in spec.sections] if not rep.get("results") else rep["results"]
        rep.pop("results", None)
        argv = [*inputs, *to_argv(Spec(spec.path, {"report": rep}), "report", parsers["report"]())]
        return commands["report"](argv)
    return 0
