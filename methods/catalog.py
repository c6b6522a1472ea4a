"""The method tables of docs/methods.md and docs/baselines.md, and the method list of
`python -m harness --help` (harness/cli/methods_help.py), generated from the registry.

Each method describes itself (`summary`, `doc_row`, `baseline_doc`, its Config's defaults), so
adding a method edits no document by hand: `python -m methods.catalog --write` rewrites the
generated blocks, and tests/test_docs.py fails while they are stale (`--check` does the same
from the command line). A generated block sits between `<!-- BEGIN generated: NAME -->` and
`<!-- END generated: NAME -->` lines; the prose around it is written by hand.

Only the package's own methods are listed: plug-ins from elsewhere (`HARNESS_PLUGINS`) document
themselves, and a test's temporary method must not make the documents stale. The help's list is
generated so that `--help` imports neither the methods nor torch (under half a second instead of
two); with plug-ins present the CLI builds it live with `help_text()` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from methods import registry
from methods.base import Method
from methods.depth.ranked import RankedDepthMethod
from methods.kv.baselines import KVBaseline

ROOT = Path(__file__).resolve().parent.parent

# Rows for methods whose module does not describe them yet. methods/kv/baselines.py is being
# rewritten elsewhere; once its classes set `doc_row`, these entries go.
PENDING_ROWS: dict[str, tuple[str, str, str]] = {
    "streamingllm": ("the `base` method's (default `pdtrim`)", "the base's",
                     "every decode layer: the first `n_sink` (4) + the most recent positions (StreamingLLM, arXiv 2309.17453); "
                     "as many layer-positions as the base's KV policy sends (equal bytes), or `keep_tokens` / `keep_ratio` per layer"),
    "snapkv": ("the `base` method's (default `pdtrim`)", "the base's",
               "per KV head, the last `window` (32) + the prefix positions the window attends to most in prefill (SnapKV, "
               "arXiv 2404.14469); as many layer-positions as the base's KV policy sends (equal bytes), or `keep_tokens` / "
               "`keep_ratio` per layer"),
}


def builtin() -> list[type[Method]]:
    """The registered methods defined in this package, by name (a KV baseline: when its policy is the package's;
    the baseline class itself always lives in methods.kv.baselines)."""
    def own(cls: type) -> bool:
        policy = getattr(cls, "policy_cls", None)
        return policy.__module__.startswith("harness.pd.kv.") if policy is not None else cls.__module__.startswith(f"{__package__}.")

    return [registry.get(n) for n in registry.names() if ":" not in n and own(registry.get(n))]


def methods_table() -> str:
    """docs/methods.md's table: every method's prefill stage, decode stage and KV handoff, then each wrapper family."""
    lines = ["| name | prefill stage | decode stage | KV |", "|---|---|---|---|"]
    for cls in builtin():
        row = cls.doc_row or PENDING_ROWS.get(cls.name)
        if row is None:  # a method that does not describe itself: its summary
            row = _summary_row(cls)
        lines.append(f"| `{cls.name}` | {' | '.join(row)} |")
    for w in registry.wrappers():
        bases = [b for b in registry.bases_of(w.prefix) if registry.get(b) in builtin()]
        if w.doc_row is not None:
            lines.append(f"| `{w.prefix}<base>` | {' | '.join(w.doc_row(bases))} |")
    return "\n".join(lines)


def _summary_row(cls: type[Method]) -> tuple[str, str, str]:
    """The row of a method without `doc_row`: a ranked one removes the same blocks in both stages and sends every
    position; a KV baseline (a plug-in policy's too) runs its base's layers and prunes the KV as its summary says."""
    if issubclass(cls, RankedDepthMethod):
        return cls.summary, "same blocks", "all positions"
    if issubclass(cls, KVBaseline):
        return f"the `base` method's (default `{cls.Config().base}`)", "the base's", cls.summary.split("; ", 1)[-1]
    return cls.summary, "", ""


def baselines_table() -> str:
    """docs/baselines.md's table of depth-pruning baselines (those with `baseline_doc` or a stage
    variant), then every option of each with its default."""
    chosen = [c for c in builtin() if c.baseline_doc is not None or c.stage_variant]
    stage = set(registry.stage_bases())
    lines = ["| name | paper | criterion | calibration | stage variant |", "|---|---|---|---|---|"]
    for cls in chosen:
        paper, criterion, calib = cls.baseline_doc or ("—", cls.summary, "yes" if cls.needs_calibration else "none")
        variant = f"`stage:{cls.name}`" if cls.name in stage else "none"
        lines.append(f"| `{cls.name}` | {paper} | {criterion} | {calib} | {variant} |")
    lines += ["", "Options and their defaults (`--set NAME.OPTION=VALUE`):", ""]
    for cls in chosen:
        opts = ", ".join(f"`{f.name}` = {f.default!r}" for f in dataclasses.fields(cls.Config))
        lines.append(f"- `{cls.name}`: {opts}")
    return "\n".join(lines)


def help_text(builtin_only: bool = False) -> str:
    """`python -m harness --help`'s list of methods (each with its options), the `stage:` family,
    the calibration options and the long-context tasks; `builtin_only`: the package's own methods
    only (the generated copy), else every registered one (plug-ins too)."""
    from harness.config import options_help
    from harness.quality import long_tasks
    from harness.quality.calibration import CalibConfig
    from methods.depth.stage import STAGE_OPTIONS

    classes = builtin() if builtin_only else [registry.get(n) for n in registry.names() if ":" not in n]
    lines = ["methods (options via --set METHOD.OPTION=VALUE):"]
    for cls in classes:
        lines += [f"  {cls.name:16s} {cls.summary}", f"  {'':16s} options: {options_help(cls.Config)}"]
    bases = [b for b in registry.stage_bases() if registry.get(b) in classes]
    stage_opts = ", ".join(f"{o}={d} (int)" for o, d in STAGE_OPTIONS)
    lines.append(f"  {'stage:BASE':16s} BASE's removal order with the stage-aware scheme: prefill removes its first k_prefill "
                 f"blocks, decode its first k_decode (unified: k_unified); BASE one of {', '.join(bases)}")
    lines.append(f"  {'':16s} options: {stage_opts}, prefill_ratio=None (float; when set, k_prefill = floor(prefill_ratio · "
                 "k_decode)), plus BASE's options except k (e.g. --set stage:sleb.k_decode=6)")
    lines.append(f"  {'calib':16s} calibration set: {options_help(CalibConfig)} (seed defaults to --seed)")
    lines.append("long-context tasks (options via --set TASK.OPTION=VALUE when the task is in --tasks):")
    tasks = [n for n in long_tasks.names() if not builtin_only or long_tasks.get(n).__module__.startswith("harness.quality.long_tasks.")]
    lines += [f"  {name:16s} options: {options_help(long_tasks.get(name).Config)}" for name in tasks]
    return "\n".join(lines if builtin_only else lines + _plugin_tasks_and_figures())


def _plugin_tasks_and_figures() -> list[str]:
    """The plug-in lm-eval tasks on local data and latency figures, as the list above names plug-in methods and
    long-context tasks (`--help` named neither): those of the package are documented (docs/tasks.md, docs/latency.md)
    and have no options, so only plug-ins are listed, and without any the text is the generated one."""
    from harness.latency.figures import FIGURES
    from harness.quality import local_tasks

    local = [local_tasks.get(n) for n in local_tasks.names() if not local_tasks.is_builtin(local_tasks.get(n))]
    figures = {n: f for n, f in FIGURES.items() if f.__module__ != "harness.latency.figures"}
    lines = []
    if local:
        lines.append("plug-in lm-eval tasks on local data (--tasks NAME with --data-dir):")
        lines += [f"  {c.name:16s} lm-eval's {c.upstream} on {', '.join(c.files)} ({c.__module__})" for c in local]
    if figures:
        lines.append("plug-in latency figures (each `python -m harness latency` record stores them):")
        lines += [f"  {n:16s} {f.__module__}.{f.__qualname__}" for n, f in figures.items()]
    return lines


def help_module() -> str:
    """harness/cli/methods_help.py: `help_text(builtin_only=True)` as a constant."""
    body = "\n".join(f"    {line!r}" for line in (ln + "\n" for ln in help_text(builtin_only=True).split("\n")))
    return (f'''"""`python -m harness --help`'s list of methods and task options, without importing the methods (or torch).

Generated by `python -m methods.catalog --write` from the registry; do not edit. tests/test_docs.py
fails while it is stale. With plug-ins present, harness/cli/run.py builds the list live instead.
"""

# ruff: noqa: E501

TEXT = (
{body}
).rstrip("\\n")
''')


# file (relative to the repository) -> generated blocks in it
BLOCKS = {"docs/methods.md": {"methods": methods_table}, "docs/baselines.md": {"baselines": baselines_table}}
# file (relative to the repository) -> its whole generated content
FILES = {"harness/cli/methods_help.py": help_module}


def render(text: str, blocks: dict) -> str:
    """`text` with each generated block replaced by its current content; ValueError if a marker is missing."""
    for name, make in blocks.items():
        pattern = re.compile(rf"(<!-- BEGIN generated: {name} [^\n]*-->\n).*?(<!-- END generated: {name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"no generated block {name!r} (<!-- BEGIN generated: {name} ... --> ... <!-- END generated: {name} -->)")
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def stale(root: Path = ROOT) -> list[str]:
    """The documents (and generated files) that differ from what the registry makes."""
    docs = [f for f, blocks in BLOCKS.items() if render((root / f).read_text(), blocks) != (root / f).read_text()]
    files = [f for f, make in FILES.items() if not (root / f).is_file() or (root / f).read_text() != make()]
    return docs + files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.catalog", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite the generated blocks in place")
    p.add_argument("--check", action="store_true", help="exit 1 when a generated block is stale")
    args = p.parse_args(argv)
    missing = [f for f in BLOCKS if not (ROOT / f).is_file()]
    if (args.write or args.check) and missing:  # an installed package: the docs are the repository's
        print(f"error: --write and --check edit the repository's documents, and {ROOT / missing[0]} is not there: "
              "run it in the harness's checkout (plain `python -m methods.catalog` prints the tables)", file=sys.stderr)
        return 2
    if args.write:
        for f, blocks in BLOCKS.items():
            (ROOT / f).write_text(render((ROOT / f).read_text(), blocks))
        for f, make in FILES.items():
            (ROOT / f).write_text(make())
        return 0
    if args.check:
        bad = stale()
        print("stale: " + ", ".join(bad) + " (run python -m methods.catalog --write)" if bad else "up to date")
        return 1 if bad else 0
    print(methods_table() + "\n\n" + baselines_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
