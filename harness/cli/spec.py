"""Experiment specs: TOML files under `configs/` that regenerate a table.

    plugins = ["my_plugins.kv"]      # optional, above the sections: plug-in modules (harness/cli/spec_plugins.py)

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

Each section becomes its command's options directly (`to_namespace`): the command's own parser is
the schema (names, defaults, types, choices), and TOML's typed values are checked and converted
value by value, with errors naming the spec file, the section and the key; no argument text is
built and re-parsed. `to_argv` remains for the one place a section must become a command line:
a sweep cell that runs as its own process.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cli import spec_plugins
from harness.config import did_you_mean
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
    plugins: tuple[str, ...] = ()  # the top-level `plugins` key: module names, imported by load_spec

    def out(self, section: str) -> Path | None:
        v = self.sections.get(section, {}).get("out")
        if v is not None and not isinstance(v, str):
            raise UsageError(f"{self.path} [{section}] out: expected a folder path in quotes, got {v!r}")
        return Path(v).expanduser() if v else None  # as the flags expand ~ (harness.cli.flags.user_dir)


def load_spec(path: str | Path, flag: str = "--config") -> Spec:
    """The spec at `path`; its errors name it as the option that gave it (`--config`, check's `--spec`; "" for none)."""
    if not str(path).strip():  # Path("") is the current folder: "--config .: not a readable TOML file"
        raise UsageError(f"{flag or 'spec'}: an empty path (an unset shell variable?); give a spec file, e.g. configs/ci.toml")
    p = Path(path)
    what = f"{flag} {p}" if flag else str(p)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{what}: no such file (specs live in configs/, e.g. configs/ci.toml)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{what}: not a readable TOML file ({e})") from None
    plugins = spec_plugins.parse(p, data.pop(spec_plugins.KEY)) if spec_plugins.KEY in data else ()
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        what = "section(s)" if all(isinstance(data[k], dict) for k in unknown) else "key(s)"
        raise UsageError(f"{p}: unknown {what} {', '.join(unknown)}{did_you_mean(unknown[0], [*SECTIONS, spec_plugins.KEY])}"
                         f"; a spec has [run], [latency] and/or [report] sections and, above them, the key "
                         f"{spec_plugins.EXAMPLE}")
    bad = [k for k in data if not isinstance(data[k], dict)]
    if bad:
        raise UsageError(f"{p}: {', '.join(bad)} must be a [section] table")
    if "run" not in data and "latency" not in data and not data.get("report", {}).get("results"):
        raise UsageError(f"{p}: nothing to do; give a [run] or [latency] section, or [report] results = [folders]")
    spec_plugins.load(p, plugins)  # before any of the spec's method, task or figure names is resolved
    return Spec(p, {k: dict(v) for k, v in data.items()}, plugins)


def _flag(action: argparse.Action) -> str:
    """A flag's own name: its first long option string (`--out`, not its lm-eval alias `--output_path`)."""
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


def _spec_key(action: argparse.Action) -> str:
    """The key a spec uses for a flag: its long name with underscores (`--set` -> set, `--plans-from` -> plans_from)."""
    return _flag(action).lstrip("-").replace("-", "_")


def _spec_actions(parser: argparse.ArgumentParser, positionals: bool = False) -> dict[str, argparse.Action]:
    """Spec key -> the parser's action. Spec keys are the flags' names (`set` for --set, whose dest is
    `overrides`) and, with `positionals`, the positionals' dests; `config` would nest a spec in a spec
    and `help` prints and exits, so neither is a key."""
    out = {}
    for a in parser._actions:
        if a.dest in ("help", "config", argparse.SUPPRESS):
            continue
        if a.option_strings:
            out[_spec_key(a)] = a
        elif positionals:
            out[a.dest] = a
    return out


def _action(actions: dict[str, argparse.Action], spec: Spec, section: str, key: str) -> argparse.Action:
    """The action of spec key `key`, or a UsageError listing the section's keys."""
    if key not in actions:
        why = " (a spec cannot name another spec)" if key == "config" else \
            f" (it is a top-level key: put {spec_plugins.EXAMPLE} above the first [section])" \
            if key == spec_plugins.KEY else ""
        raise UsageError(f"{spec.path} [{section}]: unknown key {key!r}{why or did_you_mean(key, actions)}; "
                         f"known keys: {', '.join(sorted(actions))}")
    return actions[key]


def _values(spec: Spec, section: str, replace: dict[str, Any] | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    written: dict[str, str] = {}  # option -> the key the spec wrote it as
    for k, v in spec.sections[section].items():
        norm = k.replace("-", "_")
        if norm in written:  # `batch-size` and `batch_size`: one flag, and the last one silently won
            raise UsageError(f"{spec.path} [{section}]: {written[norm]!r} and {k!r} name the same option; keep one")
        written[norm], values[norm] = k, v
    values.update(replace or {})
    return values


def to_argv(spec: Spec, section: str, parser: argparse.ArgumentParser, replace: dict[str, Any] | None = None) -> list[str]:
    """The command-line arguments equivalent to `[section]` (after `replace`), checked against `parser`."""
    actions = _spec_actions(parser)
    argv: list[str] = []
    for key, v in _values(spec, section, replace).items():
        act = _action(actions, spec, section, key)
        flag = _flag(act)
        if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(v, bool):
                raise UsageError(f"{spec.path} [{section}]: {key} must be true or false, got {v!r}")
            if v == isinstance(act, argparse._StoreTrueAction):
                argv.append(flag)
        elif act.nargs == "?" and act.const is not None and isinstance(v, bool):
            argv += [flag] if v else []  # a flag with an optional value: true = the flag alone
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


def _convert(act: argparse.Action, v: Any, where: str) -> Any:
    """One TOML value as the parsed value of `act` (a list for a comma-separated flag, one item per
    repeat for a repeatable one), through the action's own type and choices."""
    if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(v, bool):
            raise UsageError(f"{where} must be true or false, got {v!r}")
        return v
    if act.nargs == "?" and act.const is not None and isinstance(v, bool):  # a flag with an optional value
        return act.const if v else act.default  # (--apply-chat-template [NAME]): true = the flag alone
    if isinstance(v, (dict, bool)) or (isinstance(v, list) and any(isinstance(x, (dict, list, bool)) for x in v)):
        raise UsageError(f"{where} must be a number, a string or a list of them, got {v!r}")
    if isinstance(act, argparse._AppendAction) or act.nargs in ("+", "*"):
        return [_one(act, x, where) for x in (v if isinstance(v, list) else [v])]
    if isinstance(v, list) and act.dest in PATH_KEYS:  # out = ["a", 1] wrote into a folder named "a,1"
        raise UsageError(f"{where}: expected a path in quotes, got {v!r}")
    text = ",".join(str(x) for x in v) if isinstance(v, list) else v  # a comma-separated flag's items
    return _one(act, text, where)


PATH_KEYS = ("out", "plans_from", "data_dir", "offload_folder", "results", "include_path")  # folders and files: a TOML string only


def _one(act: argparse.Action, v: Any, where: str) -> Any:
    if (act.type is Path or act.dest in PATH_KEYS) and not isinstance(v, str):  # out = 5 is not a folder named "5"
        raise UsageError(f"{where}: expected a path in quotes, got {v!r}")
    if act.dest == "model" and not isinstance(v, str):  # model = 1.5 was a hub id "1.5": each cell failed after retries
        raise UsageError(f"{where}: expected a model name or path in quotes, got {v!r}")
    try:
        out = act.type(str(v)) if act.type is not None else (v if isinstance(v, str) else str(v))
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"{where}: {e}") from None
    except (TypeError, ValueError):
        raise UsageError(f"{where}: expected {getattr(act.type, '__name__', act.type)}, got {v!r}") from None
    if act.choices is not None and out not in act.choices:
        raise UsageError(f"{where}: expected one of {', '.join(map(str, act.choices))}, got {v!r}")
    return out


def to_namespace(spec: Spec, section: str, parser: argparse.ArgumentParser,
                 replace: dict[str, Any] | None = None) -> argparse.Namespace:
    """`[section]` (after `replace`) as the options its command would parse: the parser's defaults,
    each key checked against the parser's options and converted by its type."""
    dests = {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}
    ns = argparse.Namespace(**{d: (a.type(a.default) if isinstance(a.default, str) and a.type else a.default)
                               for d, a in dests.items()})
    actions = _spec_actions(parser, positionals=True)
    for key, v in _values(spec, section, replace).items():
        act = _action(actions, spec, section, key)
        setattr(ns, act.dest, _convert(act, v, f"{spec.path} [{section}] {key}"))
    missing = [d for d, a in dests.items() if a.required and getattr(ns, d) in (None, [])]
    if missing:
        raise UsageError(f"{spec.path} [{section}]: give {', '.join(missing)}")
    return ns


def run_spec(spec: Spec, commands: dict, outs: dict[str, Path] | None = None, quiet: bool = False,
             interrupt_hint: str | None = None) -> int:
    """Run the spec's sections in order (run, latency, report) through the CLI's own commands, each
    called with the section as its options (`to_namespace`). Every section is converted and checked
    (`spec_options`) before the first one runs, so a typo in [report] exits 2 before the run's minutes.

    `outs` replaces the sections' `out` folders (the regression check reruns into a fresh folder);
    `quiet` turns off the progress bars of the run and latency sections; `interrupt_hint` replaces the run
    section's advice after Ctrl-C (a check does not resume)."""
    for section, ns in spec_options(spec, [s for s in SECTIONS if s in commands], outs, quiet):
        ns.interrupt_hint = interrupt_hint
        rc = commands[section](ns)
        if rc != 0:
            return rc
    return 0


def spec_options(spec: Spec, sections: list[str], outs: dict[str, Path] | None = None,
                 quiet: bool = False) -> list[tuple[str, argparse.Namespace]]:
    """(section, its command's options) for each of `sections` the spec has, all checked, none run:
    keys, types and choices, and what the latency and report commands would refuse before their work."""
    from harness.cli.latency import latency_parser
    from harness.cli.report import report_parser
    from harness.cli.run import run_parser

    outs = outs or {}
    resolved = {s: outs.get(s) or spec.out(s) for s in ("run", "latency")}
    for s in ("run", "latency"):
        if s in spec.sections and resolved[s] is None:
            raise UsageError(f"{spec.path} [{s}]: give out = \"<folder>\" so a rerun resumes its finished records")
        if s in spec.sections and s not in outs:
            _refuse_other_folder(spec, s, resolved[s])
    options = []
    for section, parser in (("run", run_parser), ("latency", latency_parser)):
        if section not in spec.sections or section not in sections:
            continue
        replace: dict[str, Any] = {"out": str(resolved[section])}
        if section == "latency":
            replace.update(from_run(spec, resolved["run"]))
        if quiet:
            replace["quiet"] = True
        options.append((section, to_namespace(spec, section, parser(), replace)))
        if section == "latency":
            check_latency(spec, options[-1][1])
    if "report" in spec.sections and "report" in sections:
        rep = dict(spec.sections["report"])
        inputs = report_inputs(spec, [str(resolved[s]) for s in ("run", "latency") if s in spec.sections])
        rep.pop("results", None)
        ns = to_namespace(Spec(spec.path, {"report": rep}), "report", report_parser(), {"results": inputs})
        ran = [m for _, o in options for m in o.methods] if "results" not in spec.sections["report"] else None
        check_report(spec, ns, ran)
        options.append(("report", ns))
    return options


def _refuse_other_folder(spec: Spec, section: str, out: Path) -> None:
    """A UsageError when the relative `out` of a spec is missing from the current folder but present beside the
    spec (its folder, or the one above: configs/ is a repository's): run from a subfolder, `--config
    ../configs/main_table.toml` silently started the whole run into a new folder there instead of reusing. From the
    spec's own folder too: `cd configs && --config main_table.toml` began the hour-long run into configs/results."""
    here = Path.cwd().resolve()
    if out.is_absolute() or out.exists():
        return
    at_spec = here == spec.path.resolve().parent  # from there a folder one level up is the trap only if it holds work
    for root in (spec.path.resolve().parent, spec.path.resolve().parent.parent):
        if (root / out).is_dir() and (not at_spec or _holds_work(root / out)):
            raise UsageError(f"{spec.path} [{section}] out = {str(out)!r}: no such folder in the current folder "
                             f"({here}), but {root / out} exists; relative paths in a spec are read from the current "
                             f"folder: run from {root}, or for a new run here give the spec an absolute out")


def _holds_work(folder: Path) -> bool:
    """Whether `folder` holds a run's records or resume states (`<method>__<mode>*.json`), at any depth (a sweep's)."""
    from harness.store.records import run_files_under

    return next(run_files_under(folder), None) is not None


def from_run(spec: Spec, run_out: Path | None) -> dict[str, Any]:
    """What `plans_from = "run"` puts into the `[latency]` section: the run's records folder and, when the section
    has no `set` of its own, the `[run]` section's `set` items for its methods and the calibration (its plans were
    made with those options; a plan made with other options is refused). Nothing for another `plans_from`."""
    latency = spec.sections["latency"]
    if latency.get("plans_from") != "run":
        return {}
    if run_out is None or "run" not in spec.sections:
        raise UsageError(f"{spec.path} [latency]: plans_from = \"run\" needs a [run] section")
    run = spec.sections["run"]
    from harness.config import DEFAULT_METHODS

    methods = latency.get("methods", DEFAULT_METHODS)  # a section without methods measures the latency command's default
    # a value of another type (`methods = 5`) inherits nothing here: the section's own check names it
    methods = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else \
        list(methods) if isinstance(methods, (list, tuple)) else []
    items = run.get("set", [])
    items = [items] if isinstance(items, str) else items if isinstance(items, list) else []  # set = 5: [run]'s check names it
    inherited = [x for x in items if isinstance(x, str) and x.partition(".")[0].strip() in {*methods, "calib"}]
    return {"plans_from": str(run_out), **({"set": inherited} if "set" not in latency and inherited else {})}


def report_inputs(spec: Spec, default: list[str]) -> list[str]:
    """The folders `[report]` renders: its `results` (a list of folders, or one folder as a string, as
    list keys take one string elsewhere), else `default` (the run's and latency's out folders)."""
    v = spec.sections.get("report", {}).get("results")
    if v is None or v == []:
        return default
    items = v if isinstance(v, list) else [v]
    if not all(isinstance(x, str) and x for x in items):
        raise UsageError(f"{spec.path} [report] results: expected a folder or a list of folders, e.g. "
                         f"results = [\"results/runs/main\"], got {v!r}")
    return items


def check_latency(spec: Spec, ns: argparse.Namespace) -> None:
    """What `python -m harness latency` refuses before its model work (decode modes, warm-up, methods and
    their `--set` options), for `[latency]`'s options: a spec fails at once, not after its quality run."""
    from harness.cli.flags import need_records_folder
    from harness.cli.latency import check_latency_args
    from harness.config import RunConfig
    from harness.latency.measure import DECODE_MODES
    from harness.run import pipeline

    try:
        check_latency_args(ns, DECODE_MODES)
        data_dir = str(Path(ns.data_dir).resolve()) if ns.data_dir else None
        prepared = pipeline.prepare(RunConfig(methods=ns.methods, tasks=(), seed=ns.seed, data_dir=data_dir,
                                              overrides=tuple(ns.overrides)), need_data=ns.plans_from is None)
        if spec.sections["latency"].get("plans_from") == "run" and "run" in spec.sections:
            _same_options_as_run(spec, prepared.methods)
        else:  # a typo'd folder: refused now, not after the whole [run]
            need_records_folder(ns.plans_from, "plans_from")
        run_out = spec.out("run") if "run" in spec.sections else None
        if ns.out and run_out and Path(ns.out).resolve() == run_out.resolve():
            raise UsageError(f"out {ns.out} is [run]'s out too: a folder holds one run's records (its latency records "
                             "would be refused beside the quality records of their methods, after the whole [run]); "
                             "give [latency] an out of its own")
        if ns.out:  # its records of an edited plug-in: refused now, not after the quality run
            from harness.run.latency_run import refuse_edited_plugins

            refuse_edited_plugins(Path(ns.out), prepared.methods)
    except UsageError as e:
        raise UsageError(f"{spec.path} [latency]: {e}") from None


def _same_options_as_run(spec: Spec, methods: dict[str, Any]) -> None:
    """A UsageError when a method of `[latency]` (plans_from = "run") has other options than in `[run]`: its
    replay would be refused after the whole quality run."""
    from harness.cli.run import run_config, run_parser
    from harness.run import pipeline
    from harness.run.reuse import options_diff, with_defaults

    run = pipeline.prepare(run_config(to_namespace(spec, "run", run_parser(), {"out": "."})), need_data=False)
    for name, method in methods.items():
        if name in run.methods:
            here, there = (with_defaults(m, m.options()) for m in (method, run.methods[name]))
            if here != there:
                diff = options_diff(there, here, "in [run]", "here")
                raise UsageError(f"{name}'s options differ from [run]'s ({diff}); plans_from = \"run\" replays the run's "
                                 "plans: give the same set, or leave set out to take [run]'s")


def check_report(spec: Spec, ns: argparse.Namespace, methods: list[str] | None = None) -> None:
    """What `python -m harness report` would refuse only while rendering: an unknown metric convention, and a
    `baseline` none of `methods` (the spec's runs' methods, when the report reads only them) can match."""
    from harness.config import sweep_base
    from reports.collect import CONVENTIONS

    if ns.metric_convention not in CONVENTIONS:
        raise UsageError(f"{spec.path} [report] metric_convention: expected one of {', '.join(CONVENTIONS)}, "
                         f"got {ns.metric_convention!r}")
    given = spec.sections["report"].get("baseline")
    if methods is not None and given is not None and sweep_base(str(given)) not in methods:
        raise UsageError(f"{spec.path} [report] baseline {given!r}: not a method of this spec's runs"
                         f"{did_you_mean(str(given), methods)}; its methods: {', '.join(dict.fromkeys(methods))}")
