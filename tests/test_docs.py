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


def test_method_tables_are_generated_from_the_registry():
    """README.md's and docs/baselines.md's method tables are what `python -m methods.catalog --write`
    makes from the registry: every method is listed from its own module, with no hand edit."""
    import methods
    from methods import catalog

    assert catalog.stale() == [], "run python -m methods.catalog --write"
    table = (ROOT / "README.md").read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
    for name in methods.names():
        if not name.startswith("stage:"):
            assert f"| `{name}` |" in table, name
    assert "| `stage:<base>` |" in table and all(f"`{b}`" in table for b in methods.registry.stage_bases())


def test_the_catalog_lists_only_the_package_methods_and_rejects_missing_markers(tmp_path):
    import pytest

    from methods import catalog, registry
    from methods.base import Method

    class Outside(Method):
        name = "outside_plugin"
        summary = "a method from another package"

        def plan(self, model, calib, mode):
            raise NotImplementedError

    Outside.__module__ = "elsewhere"
    registry.register(Outside)
    try:
        assert "outside_plugin" not in catalog.methods_table() and catalog.stale() == []
    finally:
        registry.unregister("outside_plugin")
    with pytest.raises(ValueError, match="no generated block 'methods'"):
        catalog.render("no markers here", {"methods": catalog.methods_table})
