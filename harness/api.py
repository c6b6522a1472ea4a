"""The harness from Python (a notebook, a script): `evaluate` runs what `python -m harness` runs and
returns its tidy rows; `load_results` reads any run folder into the same table.

    import harness
    df = harness.evaluate(methods=["unpruned", "shortgpt"], tasks=["arc_easy"], limit=50, mode="both")
    df.pivot_table(index=["method", "mode"], columns="task", values="value")

The rows are those of a run's `summary.csv`: one per (method, mode, task, metric), with `value`,
`stderr`, `kv_bytes_sent` (per task, summed over its requests), `n_samples`, whether the metric is
the task's primary one, the removed blocks per stage and the record's `run_key`.

This module is light at import (pandas, torch and the CLI load inside the functions): `harness`
re-exports its functions, so `help(harness.evaluate)` shows their own docs and signatures.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessWarning, UsageError

if TYPE_CHECKING:
    import argparse

    import pandas as pd

    from harness.store.records import RunRecord

NUMERIC = ("value", "stderr", "kv_bytes_sent", "kv_bytes_sent_paged", "n_samples")  # float64, then Int64
API = Path("harness.evaluate()")  # how option errors name their source, as a spec names its file


def load_results(path: str | Path) -> pd.DataFrame:
    """Every finished record under `path` (a run folder, searched recursively, or one record file) as
    tidy rows with the columns of `summary.csv` and `source`, the record file each row was read from; numbers as
    numbers, a missing value as pandas' missing marker (NaN in `value` and `stderr`, `<NA>` in the exact integer
    columns `kv_bytes_sent`, `kv_bytes_sent_paged`, `n_samples`).

    An unreadable record under a folder is skipped with a `HarnessWarning` naming it (as `python -m
    harness report` skips it), as is a second record of one method and mode in one folder (a renamed copy); one
    given as `path` raises its `RecordError`. A folder without records gives an empty table and a `HarnessWarning`
    saying so. Records of one method and mode from several folders (separate runs under one parent) are all
    returned, with a `HarnessWarning`: tell them apart by `source` before grouping or pivoting."""
    from harness.store.records import RecordError, load, record_files_under, unfinished_hint

    p = _results_path(path)
    if p.is_file():
        return _table([load(p)], [p])
    files = record_files_under(p)
    if not files:  # a mistyped or not-yet-finished folder: an empty table would look like a run that scored nothing
        warnings.warn(f"load_results({str(path)!r}): no run records (<method>__<mode>.json) under it; an empty table"
                      f"{unfinished_hint(p)}", HarnessWarning, stacklevel=2)
    loaded: dict[Path, RunRecord] = {}
    for f in files:
        try:
            loaded[f] = load(f)
        except RecordError as e:  # one bad file must not hide the others
            warnings.warn(f"load_results: {e}; skipped", HarnessWarning, stacklevel=2)
    kept = _one_per_folder(loaded)
    _warn_mixed_runs(path, {f: loaded[f] for f in kept})
    return _table([loaded[f] for f in kept], kept)


def _results_path(path: Any) -> Path:
    """`path` as a Path to an existing folder or record file; a UsageError naming what to give instead."""
    from harness.store.records import is_record_file

    if not isinstance(path, (str, os.PathLike)) or str(path) == "":  # "" is the current folder: every record below it
        raise UsageError(f"load_results({path!r}): expected the path of a run folder or of a METHOD__MODE.json record "
                         f"(a str or pathlib.Path), got {'an empty string' if path == '' else type(path).__name__}")
    p = Path(path).expanduser()  # as evaluate's out (`out="~/runs/x"`) and the command's folders expand it
    if not p.exists():
        raise UsageError(f"load_results({str(path)!r}): no such file or folder")
    if p.is_file() and not is_record_file(p):  # summary.csv, a note, lm-eval's results file, a per-item log
        # the nearest folder above holding records: a per-item log's or lm-eval's results file's run (two levels up)
        run = next((d for d in list(p.parents)[:3] if any(is_record_file(f) for f in d.iterdir())), None)
        hint = f"give the run folder: load_results({str(run)!r})" if run is not None else \
            "give a run folder (one holding <method>__<mode>.json records)"
        raise UsageError(f"load_results({str(path)!r}): not a record (a run's records are its METHOD__MODE.json "
                         f"files); {hint}")
    return p


def _one_per_folder(loaded: dict[Path, RunRecord]) -> list[Path]:
    """The files to keep: one record per (method, mode, kind) and folder, the one in the cell's own file name (else
    the first); each other one, a renamed copy whose rows could not be told apart, is skipped with a warning."""
    from harness.store.records import one_of_a_cell

    kept: dict[tuple, Path] = {}
    for f, r in loaded.items():
        cell = (f.parent, r.method, r.mode, r.config.get("kind"))
        if cell not in kept:
            kept[cell] = f
            continue
        first = kept[cell]
        kept[cell], _, why = one_of_a_cell(first, loaded[first], f, r)
        warnings.warn(f"load_results: {why}", HarnessWarning, stacklevel=3)
    return sorted(kept.values())


def _warn_mixed_runs(path: Any, records: dict[Path, RunRecord]) -> None:
    """A HarnessWarning when one method and mode has records in several folders: grouped by method, their rows
    were summed or averaged across runs without a word (a KV ratio of 0.204 for 0.5)."""
    folders: dict[tuple, list[Path]] = {}
    for f, r in records.items():
        folders.setdefault((r.config.get("model"), r.method, r.mode, r.config.get("kind")), []).append(f.parent)
    mixed = {k: v for k, v in folders.items() if len(v) > 1}
    if mixed:
        (_, method, mode, _), where = next(iter(mixed.items()))
        warnings.warn(f"load_results({str(path)!r}): {len(mixed)} method/mode pair(s) have records in several folders "
                      f"(e.g. {method}/{mode} in {', '.join(map(str, where[:3]))}{' ...' if len(where) > 3 else ''}): "
                      "rows of separate runs; tell them apart by the `source` column before grouping or pivoting, or "
                      "load one run folder", HarnessWarning, stacklevel=3)


def _table(records: list[RunRecord], files: list[Path]) -> pd.DataFrame:
    """The rows of `records` (`summary_rows`), each with `source`, the file of its record (`files`, in order)."""
    import pandas as pd

    from harness.store.records import SUMMARY_COLUMNS, summary_rows

    rows = [{**row, "source": str(f)} for r, f in zip(records, files, strict=True) for row in summary_rows([r])]
    df = pd.DataFrame(rows, columns=[*SUMMARY_COLUMNS, "source"])
    for col in NUMERIC[:2]:  # a missing stderr (None in every row, e.g. mmlu at limit 1) is NaN too
        df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce").astype("float64")
    for col in NUMERIC[2:]:
        df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce").astype("Int64")
    df["primary"] = df["primary"].astype(bool)  # also with no rows (a folder without records)
    text = [c for c in [*SUMMARY_COLUMNS, "source"] if c not in (*NUMERIC, "primary")]
    df[text] = df[text].astype(pd.Series([""]).dtype)  # pandas' text dtype of a filled column, also with no rows
    return df


def evaluate(**options: Any) -> pd.DataFrame:
    """Run methods' plans on tasks, as `python -m harness` with the same options (keyword names are
    the command's flags with underscores: `methods`, `model`, `tasks`, `limit`, `mode`, `set`,
    `out`, `seed`, `batch_size`, `device`, `data_dir`, ...; lm-eval's names the command accepts, such
    as `output_path` for `out`, too; lists where the flag takes a comma-separated list; None for an
    option's default, except `limit=None`: all items), and return the run's rows (`load_results`)
    for these methods and modes.

    Finished records in `out` are reused, as on the command line. Bad options raise `UsageError`
    (the command line's exit 2), as does a cell refused for bad input (e.g. `out` holds another
    configuration's record); a failed cell raises `RuntimeError` after the others finished. Either
    names each failed cell and why. Ctrl-C raises `KeyboardInterrupt` (finished records are kept).
    The rows are this call's records only, not other runs' in `out` or below it."""
    import methods
    from harness.cli.run import default_out, run_config, run_parser
    from harness.cli.spec import Spec, to_namespace
    from harness.run import pipeline
    from harness.store.records import load, record_filename

    # a KV policy registered in a notebook cell after `methods` was imported gets its KV-baseline method here, as the
    # command line's import of `methods` gives one to a plug-in's policy (else: "unknown method", naming HARNESS_PLUGINS)
    methods.load_plugins("")
    parser = run_parser()
    args = to_namespace(Spec(API, {"run": _section(options, parser)}), "run", parser)  # the command's checks
    cfg = run_config(args)
    args.out = Path(args.out) if args.out else default_out(cfg)
    rc = _run(args)
    if rc == 130:  # Ctrl-C inside the run: cmd_run said what is kept; the interrupt is the caller's to handle
        raise KeyboardInterrupt
    cells = [(name, mode) for name in pipeline.prepare(cfg, need_data=False).methods for mode in cfg.modes]
    if rc != 0:  # swept variants (shortgpt@k=2) included above
        raise _cells_failed(rc, args.out, cells)
    files = sorted(args.out / record_filename(*cell) for cell in cells)  # load_results' order
    return _table([load(f) for f in files], files)


def _run(args: argparse.Namespace) -> int:
    """The command's run (its exit status), leaving the notebook as it was: the warning filters, library logs and
    bars the run silences for the process put back, tqdm's bars off with `quiet` although tqdm was imported before
    the run, and nothing of the run holding its model (PDTrim's shared search state did)."""
    from harness.cli.interrupt import ctrl_c_noted
    from harness.cli.run import cmd_run
    from harness.run.quiet import bars_off, kept

    with kept(), bars_off(args.quiet), ctrl_c_noted():  # a Ctrl-C a library swallowed still stops the run
        try:
            return cmd_run(args)
        finally:
            if (cached := sys.modules.get("methods.cached")) is not None:
                cached.release_models()


def _section(options: dict[str, Any], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The keywords as a spec's [run] section: a tuple as a list, a `Path` as text, an lm-eval alias (output_path) as the
    flag's own key (out), and None left out so the option keeps its default, as a flag not given
    would (converted, it would be the text "None"); `limit=None` stays, as the flag's 'all'."""
    aliases = {}
    for act in parser._actions:
        names = [o.lstrip("-").replace("-", "_") for o in act.option_strings if o.startswith("--")]
        aliases.update({alias: names[0] for alias in names[1:]})
    section: dict[str, Any] = {}
    for key, v in options.items():
        if v is None and key != "limit":
            continue
        name = aliases.get(key, key)
        if name in section:
            raise UsageError(f"{API} [run]: {key} is another name of {name}; give one of them")
        section[name] = _value(v)
    return section


def _value(v: Any) -> Any:
    """A keyword's value as a spec's: a tuple as a list, a path object (`pathlib.Path`) as its text."""
    if isinstance(v, (tuple, list)):
        return [_value(x) for x in v]
    return os.fspath(v) if isinstance(v, os.PathLike) else v


def _cells_failed(rc: int, out: Path, cells: list[tuple[str, str]]) -> Exception:
    """The error of a run whose exit status `rc` says cells failed, naming each and why: the one line the
    command line printed, read from the `.failed.json` note the run wrote for each of this call's
    failed cells (a cell that finished has none)."""
    import json

    from harness.store.records import failure_filename

    lines = []
    for name, mode in cells:
        try:
            note = json.loads((out / failure_filename(name, mode)).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # finished, or its note could not be written (e.g. a full disk)
            continue
        kind = "" if rc == 2 else f"{note.get('error_type')}: "  # 2: all bad input, whose message says what to change
        lines.append(f"\n  {name}/{mode}: {kind}{note.get('error')}")
    error = UsageError if rc == 2 else RuntimeError
    return error(f"harness.evaluate(): {len(lines) or 'some'} of {len(cells)} cells failed (exit status {rc}); their "
                 f"notes are in {out}" + "".join(lines))
