"""Move pd-harness into the layered layout and rewrite every reference (run from the repo root).

Idempotent on already-moved files; one regex pass per file so a rewritten name is never rewritten again.
"""
import re, subprocess, sys
from pathlib import Path

MOVES = {  # old dotted module -> new dotted module
    "harness.plan": "harness.pd.plan", "harness.arch": "harness.pd.arch", "harness.cache": "harness.pd.cache",
    "harness.engine": "harness.pd.engine", "harness.kv_select": "harness.pd.kv_select",
    "harness.static_decode": "harness.pd.static_decode", "harness.stages": "harness.pd.stages",
    "harness.batching": "harness.pd.batching", "harness.models": "harness.pd.models",
    "harness.kv": "harness.pd.kv",
    "harness.lm": "harness.quality.lm", "harness.scoring": "harness.quality.scoring",
    "harness.offline_tasks": "harness.quality.tasks", "harness.long_tasks": "harness.quality.long_tasks",
    "harness.calibration": "harness.quality.calibration", "harness.distributed": "harness.quality.distributed",
    "harness.latency": "harness.latency.measure", "harness.transfer": "harness.latency.transfer",
    "harness.pipeline": "harness.run.pipeline", "harness.latency_run": "harness.run.latency_run",
    "harness.export": "harness.run.export", "harness.checkpoint": "harness.run.checkpoint",
    "harness.sweep": "harness.cli.sweep", "harness.spec": "harness.cli.spec",
    "harness.records": "harness.store.records", "harness.regress": "harness.store.regress", "harness.task_names": "harness.store.task_names", "harness.env": "harness.run.env",
    "harness.attention_probe": "methods.pdtrim.attention_probe", "harness.objectives": "methods.pdtrim.objectives",
    "methods.healing": "methods.pdtrim.healing", "methods.pdtrim": "methods.pdtrim.method",
    **{f"methods.{m}": f"methods.depth.{m}" for m in (
        "blocks", "ranked", "perplexity", "shortgpt", "sleb", "shortened_ppl", "shortened_taylor",
        "streamline", "tail", "random_blocks", "stage")},
    "methods.kv_baselines": "methods.kv.baselines",
}
PACKAGES = {
    "harness/pd": "The PD engine: plans, model shapes, caches, the staged prefill -> handoff -> decode run, KV policies.",
    "harness/quality": "Quality measurement: the lm-eval model, scoring, lm-eval tasks on local data, long-context tasks, calibration.",
    "harness/latency": "Latency measurement: timed prefill, handoff and decode steps, and real KV transfer between processes.",
    "harness/run": "Running methods: the pipeline over (method, mode) cells, latency runs, export. The only layer that imports `methods`.",
    "harness/store": "Records on disk, the regression check and the names records share. Torch-free: what `reports` reads.",
    "methods/depth": "Depth-pruning baselines (one file per method) and the `stage:` wrapper.",
    "methods/kv": "KV-cache baselines: a method's layer plan with a token-selection KV policy at the handoff.",
    "methods/pdtrim": "PDTrim (arXiv 2509.04467): the method, its search objectives, attention probe and healing.",
}


def path_of(mod: str, pkg_dirs: set[str]) -> str:
    p = mod.replace(".", "/")
    return p if p in pkg_dirs else p + ".py"


def move_files() -> None:
    if Path("harness/cli.py").exists():  # the CLI becomes a package: one module per command
        Path("harness/cli").mkdir(exist_ok=True)
        subprocess.run(["git", "mv", "harness/cli.py", "harness/cli/__init__.py"], check=True)
    for d, doc in PACKAGES.items():
        Path(d).mkdir(parents=True, exist_ok=True)
        init = Path(d) / "__init__.py"
        if not init.exists():
            init.write_text(f'"""{doc}"""\n')
            subprocess.run(["git", "add", str(init)], check=True)
    for old, new in MOVES.items():
        src = Path(old.replace(".", "/") + ".py")
        if Path(old.replace(".", "/")).is_dir() and not src.exists():
            src = Path(old.replace(".", "/"))
            dst = Path(new.replace(".", "/"))
        else:
            dst = Path(new.replace(".", "/") + ".py")
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "mv", str(src), str(dst)], check=True)


DOTTED = re.compile(r"(?<![\w./])(harness|methods)\.(\w+)\b")
PATHS = re.compile(r"(?<![\w/.])(harness|methods)/(\w+)(\.py|/)")
FROM = re.compile(r"^([ \t]*)from (harness|methods) import (\([^)]*\)|[\w, ]+?)([ \t]*#.*)?$", re.M)


def _dotted(m: re.Match) -> str:
    key = f"{m.group(1)}.{m.group(2)}"
    return MOVES.get(key, key)


def _path(m: re.Match) -> str:
    key = f"{m.group(1)}.{m.group(2)}"
    return MOVES.get(key, key).replace(".", "/") + m.group(3) if key in MOVES else m.group(0)


def _from(m: re.Match) -> str:
    indent, pkg, names, comment = m.group(1), m.group(2), m.group(3), m.group(4) or ""
    out, keep = [], []
    for raw in names.strip("() \n").split(","):
        name = raw.split("#")[0].strip()
        if not name:
            continue
        base, _, alias = name.partition(" as ")
        new = MOVES.get(f"{pkg}.{base.strip()}")
        if new is None:
            keep.append(name)
            continue
        parent, _, leaf = new.rpartition(".")
        asname = alias.strip() or base.strip()
        parent = parent.replace(".", "\x00")  # shielded from the dotted pass that follows
        out.append(f"{indent}from {parent} import {leaf}" + ("" if asname == leaf else f" as {asname}"))
    if not out:
        return m.group(0)
    if keep:
        out.insert(0, f"{indent}from {pkg} import {', '.join(keep)}")
    out[-1] += comment
    return "\n".join(out)


def rewrite(text: str) -> str:
    text = FROM.sub(_from, text)
    text = DOTTED.sub(_dotted, text)
    return PATHS.sub(_path, text).replace("\x00", ".")


def main() -> None:
    move_files()
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.toml", "*.ini", "*.cfg", ".ci/run", "*.txt"],
                           capture_output=True, text=True, check=True).stdout.split()
    changed = 0
    py = Path("pyproject.toml")
    py.write_text(py.read_text().replace(
        '[tool.setuptools]\npackages = ["harness", "methods", "reports"]',
        '[tool.setuptools.packages.find]\ninclude = ["harness*", "methods*", "reports*"]'))
    for f in files:
        p = Path(f)
        if f.startswith("results/") or not p.exists():
            continue
        old = p.read_text()
        new = rewrite(old)
        if new != old:
            p.write_text(new)
            changed += 1
    print(f"rewrote {changed} files", file=sys.stderr)


if __name__ == "__main__":
    main()
