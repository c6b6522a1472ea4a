"""The README's two quick-start commands are the ones CI runs and the ones documented."""

import re

from conftest import ROOT


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.DOTALL)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    cmds = quickstart_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds)
    run, test = cmds
    assert run.endswith("python -m harness") and "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines()


def test_pdtrim_docs_list_every_option():
    import dataclasses

    import methods

    text = (ROOT / "docs" / "pdtrim.md").read_text()
    table = text.split("## Options", 1)[1].split("\n## ", 1)[0]
    missing = [f.name for f in dataclasses.fields(methods.get("pdtrim").Config) if f"`{f.name}`" not in table]
    assert not missing, f"docs/pdtrim.md options table lacks {missing}"
