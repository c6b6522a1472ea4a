"""The harness from Python (a notebook, a script): `evaluate` runs what `python -m harness` runs and
returns its tidy rows; `load_results` reads any run folder into the same table.

    import harness
    df = harness.evaluate(methods=["unpruned", "shortgpt"], tasks=["arc_easy"], limit=50, mode="both")
    df.pivot_table(index=["method", "mode"], columns="task", values="value")

The rows are those of a run's `summary.csv`: one per (method, mode, task, metric), with `value`,
`stderr`, `kv_bytes_sent` (per task, summed over its requests), `n_samples`, whether the metric is
the task's primary one, the removed blocks per stage and the record's `run_key`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from harness.errors import UsageError

API = Path("harness.evaluate()")  # how option errors name their source, as a spec names its file


def load_results(path: str | Path) -> pd.DataFrame:
    """Every finished record under `path` (a run folder, searched recursively, or one record file) as
    tidy rows with the columns of `summary.csv`; numbers as numbers, a missing value as NaN."""
    from harness.store.records import record_files_under

    p = Path(path)
    if not p.exists():
        raise UsageError(f"load_results({str(path)!r}): no such file or folder")
    return _rows([p] if p.is_file() else record_files_under(p))


def _rows(files: list[Path]) -> pd.DataFrame:
    from harness.store.records import SUMMARY_COLUMNS, load, summary_rows

    df = pd.DataFrame(summary_rows([load(f) for f in files]), columns=SUMMARY_COLUMNS)
    for col in ("value", "stderr"):  # a missing stderr (None in every row, e.g. mmlu at limit 1) is NaN too
        df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce").astype("float64")
    for col in ("kv_bytes_sent", "kv_bytes_sent_paged", "n_samples"):
        df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce").astype("Int64")
    return df


def evaluate(**options: Any) -> pd.DataFrame:
    """Run methods' plans on tasks, as `python -m harness` with the same options (keyword names are
    the command's flags with underscores: `methods`, `model`, `tasks`, `limit`, `mode`, `set`,
    `out`, `seed`, `batch_size`, `device`, `data_dir`, ...; lists where the flag takes a
    comma-separated list), and return the run's rows (`load_results`) for these methods and modes.

    Finished records in `out` are reused, as on the command line. Bad options raise `UsageError`
    (the command line's exit 2), as does a cell refused for bad input (e.g. `out` holds another
    configuration's record); a failed cell raises `RuntimeError` after the others finished. The rows
    are this call's records only, not other runs' in `out` or below it."""
    from harness.cli.run import cmd_run, default_out, run_config, run_parser
    from harness.cli.spec import Spec, to_namespace
    from harness.run import pipeline
    from harness.store.records import record_filename

    options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}  # a tuple is a list here
    args = to_namespace(Spec(API, {"run": options}), "run", run_parser())  # the command's checks, named errors
    cfg = run_config(args)
    args.out = Path(args.out) if args.out else default_out(cfg)
    rc = cmd_run(args)
    if rc != 0:
        error = UsageError if rc == 2 else RuntimeError
        raise error(f"harness.evaluate(): some cells failed (exit status {rc}); their notes are in {args.out}")
    cells = pipeline.prepare(cfg, need_data=False).methods  # swept variants (shortgpt@k=2) included
    return _rows(sorted(args.out / record_filename(name, mode) for name in cells for mode in cfg.modes))  # load_results' order
