"""The README's two quick-start commands are the ones CI runs; the docs' generated tables are the
registry's; every relative link in the README and docs/ leads to a file (and heading) that exists."""

import re
import warnings

import pytest
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


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_pdtrim_docs_list_every_option():
    import dataclasses

    import methods

    text = (ROOT / "docs" / "pdtrim.md").read_text()
    table = text.split("## Options", 1)[1].split("\n## ", 1)[0]
    missing = [f.name for f in dataclasses.fields(methods.get("pdtrim").Config) if f"`{f.name}`" not in table]
    assert not missing, f"docs/pdtrim.md options table lacks {missing}"


def test_method_tables_are_generated_from_the_registry():
    """docs/methods.md's and docs/baselines.md's method tables (and the --help list) are what
    `python -m methods.catalog --write` makes from the registry: every method is listed from its
    own module, with no hand edit."""
    import methods
    from methods import catalog

    assert catalog.stale() == [], "run python -m methods.catalog --write"
    table = (ROOT / "docs" / "methods.md").read_text().split("<!-- BEGIN generated: methods", 1)[1].split("<!-- END", 1)[0]
    for name in methods.names():
        if not name.startswith("stage:"):
            assert f"| `{name}` |" in table, name
    assert "| `stage:<base>` |" in table and all(f"`{b}`" in table for b in methods.registry.stage_bases())
    rows = [line.split(" | ") for line in catalog.methods_table().splitlines()[2:]]
    assert all(len(r) == 4 and all(c.strip(" |") for c in r) for r in rows), "a row with an empty stage or KV cell"


def test_the_catalog_outside_the_checkout_says_so(monkeypatch, tmp_path, capsys):
    """Installed into site-packages, `--check` and `--write` died with FileNotFoundError on docs/methods.md."""
    from methods import catalog

    monkeypatch.setattr(catalog, "ROOT", tmp_path / "site-packages")
    for flag in ("--check", "--write"):
        assert catalog.main([flag]) == 2
        assert "is not there: run it in the harness's checkout" in capsys.readouterr().err
    assert catalog.main([]) == 0 and "| `shortgpt` |" in capsys.readouterr().out


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


def test_the_api_example_runs(tmp_path, data_dir, monkeypatch):
    """docs/api.md's notebook block, run as written except for its size: the tiny random model
    (1 of 4 blocks removed), 4 items per task, the test's data and output folders."""

    text = (ROOT / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    small = {'"smollm2-135m"': '"random:tiny", device="cpu", quiet=True', '"shortgpt.k=8"': '"shortgpt.k=1"',
             "limit=50": "limit=4", '"../shared/data"': repr(str(data_dir))}
    for old, new in small.items():
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/api.md", "exec"), scope)
    df = scope["df"]
    assert set(df["method"]) == {"unpruned", "shortgpt"} and set(df["mode"]) == {"unified", "disaggregated"}
    assert set(df["task"]) == {"arc_easy", "piqa"} and (df["n_samples"] == 4).all()
    assert scope["scores"].shape == (4, 2)
    disagg = df[(df["mode"] == "disaggregated") & df["primary"]].set_index(["method", "task"])["kv_bytes_sent"]
    assert (disagg.xs("shortgpt") < disagg.xs("unpruned")).all()  # 3 of 4 layers hand KV over


def test_the_api_names_a_bad_option():
    import harness
    from harness.errors import UsageError

    with pytest.raises(UsageError, match=r"harness.evaluate\(\) \[run\] batch_size: expected a positive integer"):
        harness.evaluate(batch_size=0)
    with pytest.raises(UsageError, match="unknown key 'metods'"):
        harness.evaluate(metods=["unpruned"])
    with pytest.raises(UsageError, match="no such file or folder"):
        harness.load_results("/nonexistent/run")


def test_the_documented_stage_method_plugs_in(tmp_path, monkeypatch, tiny):
    """docs/adding.md's decode-only method, as an outside plug-in module: registered on import, listed,
    honouring the method contract, and its plans skip the middle block in decode only."""
    import importlib
    import sys

    from method_contract import check_method_contract

    import methods
    from harness.errors import UsageError
    from methods import registry

    text = (ROOT / "docs" / "adding.md").read_text()
    code = re.search(r"## A method that plans each stage itself.*?```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "pd_harness_doc_stage_method.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "pd_harness_doc_stage_method" in methods.load_plugins("pd_harness_doc_stage_method")
        assert "drop_middle_decode" in methods.names()
        check_method_contract("drop_middle_decode", tiny.model, None)
        cls = methods.get("drop_middle_decode")
        plan = cls().plan(tiny.model, None, "disaggregated")
        assert (plan.prefill_layers, plan.decode_layers) == ((0, 1, 2, 3), (0, 2, 3))  # 4 blocks: the middle one is 1
        with pytest.raises(UsageError, match="width=4: must be < the model's 4 blocks"):
            cls(cls.Config(width=4)).plan(tiny.model, None, "unified")
    finally:
        registry.unregister("drop_middle_decode")
        sys.modules.pop("pd_harness_doc_stage_method", None)
        importlib.invalidate_caches()


def test_the_api_examples_kv_ratio_counts_each_task_once():
    """docs/api.md's KV line summed `kv_bytes_sent` over every row, one per (task, metric), so a task counted as often
    as it has metrics: on results/issue3/default (passkey has 8 metric rows, pd_ppl 3, boolq 1) PDTrim's share of the
    unpruned model's KV read 0.329 where it sent 0.412. The line, run on those records, must count each task once."""
    import harness

    text = (ROOT / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    line = next(x for x in code.splitlines() if x.startswith("kv = "))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = harness.load_results(ROOT / "results" / "issue3" / "default")
    scope = {"df": df}
    exec(line, scope)
    per_task = df[df["mode"] == "disaggregated"].drop_duplicates(["method", "task"]).groupby("method")["kv_bytes_sent"].sum()
    assert (scope["kv"] / scope["kv"]["unpruned"]).to_dict() == pytest.approx((per_task / per_task["unpruned"]).to_dict())
    assert (per_task / per_task["unpruned"])["pdtrim"] == pytest.approx(0.4125, abs=1e-4)
