"""Command line: `python -m harness [run] --methods unpruned,shortgpt ...`.

Bad input exits with code 2 and a message that says what is wrong and what would be right.

One module per command (`run`, `latency`, `report`, `check`, `spec`, `sweep`, `export`) and
`flags` for the argument types they share; nothing below the CLI imports it."""

from __future__ import annotations

import os
import sys
import time

from harness.cli.check import cmd_check
from harness.cli.interrupt import sigterm_as_ctrl_c
from harness.cli.latency import cmd_latency
from harness.cli.report import cmd_report
from harness.cli.run import cmd_run
from harness.errors import PluginFailed, UsageError


def cmd_config(argv: list[str]) -> int:
    """`python -m harness --config configs/<table>.toml`: run what the spec needs, then render it."""
    from harness.cli.spec import load_spec, run_spec

    quiet = [a for a in argv if a in ("-q", "--quiet")]
    rest = [a for a in argv if a not in quiet]
    if len(rest) != 2 or rest[0] != "--config":
        raise UsageError("with --config, every option comes from the spec file (only -q may be added): "
                         "python -m harness --config configs/<table>.toml")
    if quiet:  # before checking the spec's sections imports torch, and tqdm with it, which reads this once
        os.environ["TQDM_DISABLE"] = "1"
    return run_spec(load_spec(rest[1]), COMMANDS, quiet=bool(quiet))


def cmd_sweep(argv: list[str]) -> int:
    from harness.cli.sweep import main as sweep_main

    return sweep_main(argv)


def cmd_export(argv: list[str]) -> int:
    from harness.cli.export import main as export_main

    return export_main(argv)


COMMANDS = {"run": cmd_run, "latency": cmd_latency, "report": cmd_report, "check": cmd_check, "sweep": cmd_sweep,
            "export": cmd_export}


def unknown_command(word: str) -> str:
    """What to say of a first argument that is neither a flag nor a command (a typo, or a command other tools have)."""
    from harness.config import did_you_mean

    hint = {"methods": "; the methods and their options are listed by python -m harness --help",
            "config": "; a spec runs with python -m harness --config SPEC.toml"}.get(word, "")
    return (f"unknown command {word!r}" + did_you_mean(word, COMMANDS, cutoff=0.6) + hint
            + f"; commands: {', '.join(COMMANDS)} (run is the default: python -m harness --methods ...)")


def main(argv: list[str] | None = None) -> int:
    from harness.cli.lifeline import end_with_parent

    end_with_parent()  # a sweep's cell: ends with the sweep, even one killed with SIGKILL
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["--version"], ["-V"]):
        from harness.version import __version__

        print(f"pd-harness {__version__}")
        return 0
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        print(f"error: {unknown_command(argv[0])}", file=sys.stderr)  # before the run's seconds of imports
        return 2
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    if command == "run" and any(a == "--config" or a.startswith("--config=") for a in argv):
        command, argv = "config", [x for a in argv for x in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if command in IMPORTS_TORCH and not {"-h", "--help"} & set(argv):
        _parse_first(command, argv)  # argparse's own refusals (exit 2) before the seconds of imports, not after
    if command in IMPORTS_TORCH and not {"-q", "--quiet", "-h", "--help"} & set(argv) and not _other_rank():
        # the first thing a run says: its imports (torch, transformers, lm-eval) take seconds, more on a busy machine;
        # latency and export were silent that long (6 s on a loaded 2-core machine) before their first line
        name = "python -m harness" + ("" if command == "run" else f" {command}")
        print(f"{name}: starting (importing {IMPORTS_TORCH[command]})", file=sys.stderr, flush=True)
    try:
        with sigterm_as_ctrl_c():  # a scheduler's stop: the Ctrl-C message and the rerun's advice, not a silent death
            return cmd_config(argv) if command == "config" else COMMANDS[command](argv)
    except UsageError as e:
        if _other_rank():
            # one voice: ranks meet the same refusals, and a launcher stops the others once rank 0 exits with its
            # own; a refusal of this rank alone still prints, after the wait
            time.sleep(RANK_GRACE_S)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PluginFailed as e:  # a plug-in's own error before any cell: one line naming it (exit 1, not bad input)
        if not _other_rank():
            print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # Ctrl-C while importing libraries or loading the model: one line, no traceback
        if not _other_rank():  # one voice under data parallelism (a launcher stops every rank)
            print(INTERRUPTED, file=sys.stderr)
        return 130


# the commands whose first seconds are imports of heavy libraries, and which: they say so before anything else
IMPORTS_TORCH = {"run": "torch, transformers, lm-eval", "latency": "torch, transformers", "export": "torch, transformers"}


PARSERS = {"run": ("harness.cli.run", "run_parser"), "latency": ("harness.cli.latency", "latency_parser"),
           "export": ("harness.cli.export", "parser")}  # torch-free to build


def _parse_first(command: str, argv: list[str]) -> None:
    """Parse `argv` with the command's parser (which the command parses again): a bad flag value (`--prompt-tokens 0`)
    exits 2 at once, not after "starting (importing torch, transformers)" and the imports."""
    import importlib

    module, name = PARSERS[command]
    getattr(importlib.import_module(module), name)().parse_args(argv)


def _other_rank() -> bool:
    """A data-parallel rank other than 0, as a launcher (torchrun, accelerate) sets RANK and WORLD_SIZE: rank 0 speaks
    for the group. Read from the environment: torch, which `harness.quality.distributed` needs, is not imported yet."""
    return os.environ.get("RANK", "0") != "0" and os.environ.get("WORLD_SIZE", "1") != "1"


RANK_GRACE_S = 5.0  # torchrun checks its workers every 0.1 s
INTERRUPTED = "\ninterrupted (Ctrl-C); files already finished are kept, rerun the same command to go on"
