"""`python -m harness --help` lists every command and every method without importing torch (a
generated list, harness/cli/methods_help.py, stands in for the registry), so it answers at once."""

import json
import os
import subprocess
import sys

from conftest import ROOT

# builds the top-level help in a fresh process, as `python -m harness --help` does, and reports
# which heavy libraries that imported
PROBE = """
import contextlib, io, json, sys
from harness.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main([*sys.argv[1:], "--help"])
    except SystemExit:
        pass
print(json.dumps({"help": out.getvalue(), "loaded": [m for m in ("torch", "transformers", "lm_eval", "pandas", "methods")
                                                       if m in sys.modules]}))
"""


def help_in_fresh_process(*command: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", PROBE, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_top_level_help_imports_no_torch_and_lists_every_command_and_method():
    from harness.cli import COMMANDS
    from harness.cli.run import COMMAND_SUMMARIES

    got = help_in_fresh_process()
    assert got["loaded"] == [], f"--help imported {got['loaded']}"
    text = got["help"]
    assert set(COMMAND_SUMMARIES) == set(COMMANDS)
    commands = text.split("\ncommands (", 1)[1]
    assert all(f"\n  {name} " in commands for name in COMMANDS)
    from methods import catalog

    listed = [c.name for c in catalog.builtin() if f"\n  {c.name} " not in text]
    assert not listed, f"--help lacks {listed} (run python -m methods.catalog --write)"


def test_every_command_help_imports_no_torch():
    from harness.cli import COMMANDS

    for name in COMMANDS:
        got = help_in_fresh_process(name)
        assert "torch" not in got["loaded"] and "usage: python -m harness" in got["help"], name


def test_the_generated_help_is_the_live_one_without_plugins():
    from harness.cli.methods_help import TEXT
    from methods.catalog import help_text

    assert TEXT == help_text(builtin_only=True)


def test_the_live_help_lists_plugin_local_tasks_and_latency_figures(monkeypatch):
    """It listed plug-in methods and long-context tasks, but not a plug-in lm-eval task on local data nor a plug-in
    latency figure; the package's own (no options, documented) stay out, as the generated text has them not."""
    from harness.cli.methods_help import TEXT
    from harness.latency import figures
    from harness.quality import local_tasks
    from harness.quality.local_tasks.base import LocalTask
    from methods.catalog import help_text

    class Mine(LocalTask):
        name, files, splits, upstream = "pd_help_rows", ("mine/test.jsonl",), ("test",), "sciq/sciq.yaml"

        @classmethod
        def load(cls, data_dir, subtask=None):
            return {"test": []}

    def probe(x):
        return {}

    assert help_text() == TEXT  # none yet: the generated text
    local_tasks.register_task(Mine)
    monkeypatch.setitem(figures.FIGURES, "pd_help_ms", probe)
    try:
        text = help_text()
    finally:
        local_tasks.unregister_task("pd_help_rows")
    assert text.startswith(TEXT + "\nplug-in lm-eval tasks on local data (--tasks NAME with --data-dir):\n"
                           f"  pd_help_rows     lm-eval's sciq/sciq.yaml on mine/test.jsonl ({__name__})\n")
    assert text.endswith(f"plug-in latency figures (each `python -m harness latency` record stores them):\n"
                         f"  pd_help_ms       {__name__}.{probe.__qualname__}")


def test_a_bad_flag_is_named_alone_with_the_known_flag_it_is_close_to(capsys):
    """argparse printed the whole usage (15 lines for the run command) above the message, and no hint for a typo."""
    import pytest

    from harness.cli.flags import Parser

    p = Parser(prog="python -m harness")
    p.add_argument("--limit")
    p.add_argument("--methods")
    for argv, said in ((["--limt", "3"], "unrecognized arguments: --limt 3 (--limt: did you mean --limit?)"),
                       (["--methds=a", "--zzz"], "unrecognized arguments: --methds=a --zzz (--methds: did you mean "
                                                 "--methods?)"),
                       (["--limit"], "argument --limit: expected one argument")):
        with pytest.raises(SystemExit) as stop:
            p.parse_args(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2
        assert err == f"python -m harness: error: {said}\n  (the flags: python -m harness --help)\n"


def test_every_command_parser_words_bad_flags_the_same_way():
    from harness.cli.check import check_parser
    from harness.cli.export import parser as export_parser
    from harness.cli.flags import Parser
    from harness.cli.latency import latency_parser
    from harness.cli.report import report_parser
    from harness.cli.run import run_parser
    from harness.cli.sweep import sweep_parser

    for make in (check_parser, export_parser, latency_parser, report_parser, run_parser, sweep_parser):
        assert isinstance(make(), Parser), make.__name__


def test_every_option_of_every_command_says_what_it_does():
    """`latency --help` listed `--seed SEED`, `--device DEVICE`, `--dtype DTYPE` and `-q` with no word on them (what
    the seed seeds, which devices and dtypes are accepted), and `check -q` too."""
    from harness.cli.check import check_parser
    from harness.cli.export import parser as export_parser
    from harness.cli.latency import latency_parser
    from harness.cli.report import report_parser
    from harness.cli.run import run_parser
    from harness.cli.sweep import sweep_parser

    bare = [f"{make.__name__}: {'/'.join(a.option_strings) or a.dest}"
            for make in (check_parser, export_parser, latency_parser, report_parser, run_parser, sweep_parser)
            for a in make()._actions if not a.help]
    assert not bare, f"options without help text: {bare}"


def test_a_typo_of_a_required_flag_is_named(capsys):
    """argparse says a required flag is missing before it names unknown ones: `check --againts X` got only
    "required: --against", no hint; an accepted abbreviation (`--upd`) gets none."""
    import pytest

    from harness.cli.check import check_parser

    for argv, hint in ((["--againts", "results/reference"], " (--againts: did you mean --against?)"),
                       (["--upd"], "")):
        with pytest.raises(SystemExit):
            check_parser().parse_args(argv)
        assert capsys.readouterr().err.splitlines()[0] == ("python -m harness check: error: the following arguments are "
                                                          f"required: --against{hint}")


def test_every_dtype_flag_names_its_default_and_short_names():
    """`--dtype DTYPE  auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16` said neither its default nor that
    fp32/bf16/fp16 are taken (docs/running.md says so, and so does its refusal)."""
    from harness.cli import export, latency, run

    for parser in (run.run_parser(), latency.latency_parser(), export.parser()):
        (action,) = [a for a in parser._actions if "--dtype" in a.option_strings]
        assert "(default: auto)" in action.help and "fp32, bf16, fp16" in action.help, parser.prog
        assert all(action.type(short) == full for short, full in (("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")))
