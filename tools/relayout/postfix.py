"""Hand fixes after relayout.py: shared names move to the store, the library quieting to run."""
import re
from pathlib import Path


def sub(path, old, new, count=1):
    p = Path(path)
    s = p.read_text()
    assert old in s, (path, old)
    p.write_text(s.replace(old, new, count))


# 1. task-group names: what records and reports share, torch-free in the store
cfg = Path("harness/config.py").read_text()
m = re.search(r'^STANDARD_TASKS = .*\nLONG_TASKS = .*\n', cfg, re.M)
Path("harness/store/names.py").write_text(
    '"""Names the runner writes into records and the reports read back (torch-free)."""\n\n' + m.group(0))
sub("harness/config.py", m.group(0), "from harness.store.names import LONG_TASKS, STANDARD_TASKS\n\n")
for f in ("reports/plots.py", "reports/tables.py", "harness/quality/long_tasks.py"):
    s = Path(f).read_text()
    s = re.sub(r"from harness\.config import ((?:LONG_TASKS|STANDARD_TASKS)(?:, (?:LONG_TASKS|STANDARD_TASKS))?)",
               r"from harness.store.names import \1", s)
    Path(f).write_text(s)

# 2. quieting the libraries is what every command that runs a model does: run layer
cli = Path("harness/cli/__init__.py").read_text()
m = re.search(r"^def _quiet_libraries\(\) -> None:\n(?:(?:    .*)?\n)+?\n\n", cli, re.M)
body = m.group(0).replace("def _quiet_libraries", "def quiet_libraries")
Path("harness/run/quiet.py").write_text(
    '"""Silence the logging and progress bars of the libraries a run uses (lm-eval, transformers, datasets)."""\n\n'
    "import logging\nimport os\nimport warnings\n\n\n" + body.rstrip() + "\n")
cli = cli.replace(m.group(0), "").replace("_quiet_libraries()", "quiet_libraries()")
cli = cli.replace("from harness.errors import", "from harness.run.quiet import quiet_libraries\nfrom harness.errors import", 1)
Path("harness/cli/__init__.py").write_text(cli)
sub("harness/run/export.py", "from harness.cli import _quiet_libraries", "from harness.run.quiet import quiet_libraries")
sub("harness/run/export.py", "_quiet_libraries()", "quiet_libraries()")
for f in Path("tests").glob("*.py"):
    s = f.read_text()
    if "_quiet_libraries" in s:
        f.write_text(s.replace("from harness.cli import _quiet_libraries", "from harness.run.quiet import quiet_libraries")
                     .replace("_quiet_libraries", "quiet_libraries"))
