"""Split harness/cli/__init__.py (after relayout.py) into one module per command plus shared flags."""
import ast
import re
import subprocess
from pathlib import Path

CLI = Path("harness/cli/__init__.py")
RENAME = {"_csv": "csv_list", "_positive": "positive_int", "_limit": "limit_arg", "_floats": "float_list", "_ints": "int_list"}
MODULES = {  # module -> (docstring, top-level names it takes)
    "flags": ("Argument types and flag groups shared by the commands.",
              ["MODES", "_csv", "_positive", "_limit", "_floats", "_ints"]),
    "run": ("`python -m harness [run]`: evaluate methods' plans on lm-eval and long-context tasks.",
            ["_methods_epilog", "run_parser", "check_tasks", "cmd_run"]),
    "latency": ("`python -m harness latency`: time each method's plan per workload (TTFT, ITL, handoff, transfer).",
                ["latency_parser", "cmd_latency"]),
    "report": ("`python -m harness report`: tables, plots and an HTML page from run records.", ["report_parser", "cmd_report"]),
    "check": ("`python -m harness check`: the regression check of records against a reference.", ["check_parser", "cmd_check"]),
}
HEADER_IMPORTS = """from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
"""


def segments(src: str):
    tree = ast.parse(src)
    lines = src.splitlines(keepends=True)
    out = {}
    for node in tree.body:
        name = None
        if isinstance(node, ast.FunctionDef):
            name = node.name
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        if name:
            start = (node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else node.lineno) - 1
            out[name] = "".join(lines[start:node.end_lineno])
    return out, tree


def needed(src: str, tree, body: str) -> str:
    """The module's top-level imports, each cut to the names `body` uses (dropped when none is)."""
    out = []
    for n in tree.body:
        if not isinstance(n, (ast.Import, ast.ImportFrom)) or getattr(n, "module", None) == "__future__":
            continue
        keep = [a for a in n.names if re.search(rf"(?<![\w.]){(a.asname or a.name).split('.')[0]}\b", body)]
        if not keep:
            continue
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in keep)
        out.append(f"import {names}\n" if isinstance(n, ast.Import) else f"from {n.module} import {names}\n")
    return "".join(out)


def rename(text: str) -> str:
    for old, new in RENAME.items():
        text = re.sub(rf"(?<![\w.]){old}\b", new, text)
    return text


def main() -> None:
    src = CLI.read_text()
    segs, tree = segments(src)
    top_imports = "".join(ast.get_source_segment(src, n) + "\n" for n in tree.body
                          if isinstance(n, (ast.Import, ast.ImportFrom)) and getattr(n, "module", None) != "__future__")
    owner = {name: mod for mod, (_, names) in MODULES.items() for name in names}
    for mod, (doc, names) in MODULES.items():
        body = "\n\n".join(rename(segs[n]).rstrip() + "\n" for n in names)
        used = {n for n in segs if n not in names and re.search(rf"(?<![\w.]){RENAME.get(n, n)}\b", body)}
        cross = {}
        for n in sorted(used):
            if n in owner:
                cross.setdefault(owner[n], []).append(RENAME.get(n, n))
        imports = "".join(f"from harness.cli.{m} import {', '.join(sorted(ns))}\n" for m, ns in sorted(cross.items()))
        text = f'"""{doc}"""\n\nfrom __future__ import annotations\n\n{needed(src, tree, body)}{imports}\n\n{body}'
        Path(f"harness/cli/{mod}.py").write_text(text)
        subprocess.run(["git", "add", f"harness/cli/{mod}.py"], check=True)
    rest = [n for n in segs if n not in owner]
    doc = ast.get_docstring(tree)
    cmds = "".join(f"from harness.cli.{m} import {n}\n" for m, n in
                   [("run", "cmd_run"), ("latency", "cmd_latency"), ("report", "cmd_report"), ("check", "cmd_check")])
    body = "\n\n".join(rename(segs[n]).rstrip() + "\n" for n in rest)
    CLI.write_text(f'"""{doc}\n\nOne module per command (`run`, `latency`, `report`, `check`, `spec`, `sweep`, `export`) and\n'
                   f'`flags` for the argument types they share; nothing below the CLI imports it."""\n\n'
                   f"from __future__ import annotations\n\n{needed(src, tree, body)}{cmds}\n\n{body}")


if __name__ == "__main__":
    main()


def fix_references() -> None:
    """`from harness.cli import a, b` elsewhere -> the owning modules (renamed flags included)."""
    owner = {name: mod for mod, (_, names) in MODULES.items() for name in names}
    pat = re.compile(r"^([ \t]*)from harness\.cli import ([\w, ]+?)$", re.M)

    def one(m):
        indent, out, keep = m.group(1), {}, []
        for raw in m.group(2).split(","):
            name = raw.strip()
            base, _, alias = name.partition(" as ")
            base = base.strip()
            if base in owner:
                new = RENAME.get(base, base)
                out.setdefault(owner[base], []).append(new + (f" as {alias.strip()}" if alias.strip() and alias.strip() != new else ""))
            else:
                keep.append(name)
        lines = [f"{indent}from harness.cli.{mod} import {', '.join(ns)}" for mod, ns in out.items()]
        if keep:
            lines.insert(0, f"{indent}from harness.cli import {', '.join(keep)}")
        return "\n".join(lines)

    files = subprocess.run(["git", "ls-files", "*.py"], capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        p = Path(f)
        if not p.exists() or f == str(CLI):
            continue
        s = p.read_text()
        new = pat.sub(one, s)
        if new != s:
            p.write_text(new)
