"""Move the export command's argument handling (parser, main, source resolution) into harness/cli/export.py;
harness/run/export.py keeps writing checkpoints and manifests."""
import ast
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from splitcli import needed, segments  # noqa: E402

SRC, DST = Path("harness/run/export.py"), Path("harness/cli/export.py")
CLI_NAMES = ["MODES", "MARKERS", "parser", "Source", "resolve_source", "method_for", "_prepare_out", "_size", "main",
             "_plan_to_export", "_print_checkpoints"]


def main() -> None:
    src = SRC.read_text()
    segs, tree = segments(src)
    # classes too
    lines = src.splitlines(keepends=True)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            segs[node.name] = "".join(lines[start:node.end_lineno])
    doc = ast.get_docstring(tree)
    moved = "\n\n".join(segs[n].rstrip() + "\n" for n in CLI_NAMES)
    kept_names = [n for n in segs if n not in CLI_NAMES]
    kept = "\n\n".join(segs[n].rstrip() + "\n" for n in kept_names)
    back = sorted(n for n in kept_names if re.search(rf"(?<![\w.]){n}\b", moved))
    DST.write_text(f'"""`python -m harness export`: arguments, the plan\'s source (a record, a run folder or a method),\n'
                   f'and the printout; writing the checkpoints is `harness.run.export`."""\n\nfrom __future__ import annotations\n\n'
                   f"{needed(src, tree, moved)}from harness.run.export import {', '.join(back)}\n\n\n{moved}")
    SRC.write_text(f'"""{doc}"""\n\nfrom __future__ import annotations\n\n{needed(src, tree, kept)}\n\n{kept}')
    subprocess.run(["git", "add", str(DST)], check=True)
    cli = Path("harness/cli/__init__.py")
    cli.write_text(cli.read_text().replace("from harness.run.export import main as export_main",
                                           "from harness.cli.export import main as export_main"))


if __name__ == "__main__":
    main()
