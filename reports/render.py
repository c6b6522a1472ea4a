"""`python -m harness report`: every table in Markdown, LaTeX and CSV, the plots, one HTML file.

Layout of the output folder:
    report.md, report.html         all tables (and, in HTML, the figures and provenance)
    tables/<name>.{md,tex,csv}     quality, efficiency, long_context, plans
    figures/<name>.{png,svg}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.store.records import atomic_write
from reports.collect import Collection, ReportError, collect, failure_notes, metric_for, require_one_model, select_model
from reports.efficiency import efficiency_table
from reports.formats import to_csv, to_latex, to_markdown
from reports.latency_figures import figure_failure_notes, figures_table
from reports.plans import plans_table
from reports.significance import check_baseline, paired_table
from reports.tables import long_context_table, quality_table


@dataclass
class Report:
    out: Path
    tables: list[pd.DataFrame] = field(default_factory=list)  # tidy cells (reports.formats)
    figures: dict[str, dict[str, Path]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # what could not be shown, and why

    @property
    def markdown(self) -> str:
        return "\n\n".join(to_markdown(t) for t in self.tables) + "\n"


TABLES = ("quality", "paired", "efficiency", "latency_figures", "long_context", "plans")  # in report order: tables/<name>.{md,tex,csv}


def build_tables(col: Collection, convention: str = "paper", bandwidth_gbit: float = 100.0,
                 baseline: str = "unpruned") -> tuple[list[pd.DataFrame], list[str]]:
    metric_for("arc_easy", {"acc": 0}, convention)  # unknown convention -> ReportError before any work
    tables, missing = [], []
    makers = {"quality": lambda: quality_table(col, convention), "paired": lambda: paired_table(col, baseline, convention),
              "efficiency": lambda: efficiency_table(col, bandwidth_gbit), "latency_figures": lambda: figures_table(col),
              "long_context": lambda: long_context_table(col), "plans": lambda: plans_table(col)}
    for name in TABLES:  # one list of the table names: a rerender removes by it too (`remove_stale_outputs`)
        t = makers[name]()
        if t.empty:
            paired_why = _paired_why(col, baseline)
            quality_why = "long-context tasks only: see the long_context table" if col.quality else "no quality records"
            why = {"quality": quality_why, "paired": paired_why,
                   "efficiency": "no latency records (python -m harness latency)", "latency_figures": None,
                   "long_context": "no pd_ppl/passkey scores", "plans": "no records"}[name]
            if why:  # the latency figures table is for plug-in figures: most reports have none, and say nothing of it
                missing.append(f"{name} table: not shown ({why})")
        else:
            tables.append(t)
    return tables, missing


def _paired_why(col: Collection, baseline: str) -> str:
    """Why the paired table is empty: no quality records, no `baseline` record (the default's may be absent), no other
    method's, or no per-item results to pair."""
    methods = sorted({r.method for r in col.quality})
    if not methods:
        return "no quality records"
    if baseline not in methods:
        return f"no {baseline} record; --baseline METHOD pairs with another: {', '.join(methods)}"
    if methods == [baseline]:
        return f"the records hold {baseline} only: no other method to pair with it"
    return f"no records with per-item results to pair with {baseline}"


def bandwidth_note(col: Collection, bandwidth_gbit: float) -> list[str]:
    """Why the efficiency table's E2E columns are empty: no latency record has E2E at `bandwidth_gbit`."""
    held = sorted({float(b) for r in col.latency for b in r.config.get("bandwidths_gbit") or ()})  # what latency computed E2E at
    if not held or bandwidth_gbit in held:
        return []
    return [f"E2E at --bandwidth {bandwidth_gbit:g} Gbit/s: the latency records hold it at "
            f"{', '.join(f'{b:g}' for b in held)} Gbit/s (give --bandwidth one of those)"]


MANIFEST = ".pd-harness-report.json"  # the tables and figures a report wrote into its --out: all a rerender may remove


def remove_stale_outputs(out: Path, rep: Report, plots: bool, legacy: bool = False) -> list[Path]:
    """Remove the tables (and, when the figures were rendered, the figures) an earlier report wrote into `out` that
    this one did not: a table or figure without data now is not left beside the new ones (a paper's
    \\input{tables/efficiency.tex} read the latency of records no longer reported). Only files an earlier report
    listed in `MANIFEST` go: a file of the user's under a table's name in a folder given as --out stays. `legacy`: `out`
    holds a report of a version before `MANIFEST` (its report.md, no list), whose tables and figures are all its."""
    from reports.plots import PLOTS

    written = {t.attrs["name"] for t in rep.tables}
    earlier = _manifest(out)
    stale = [f"tables/{n}.{ext}" for n in TABLES if n not in written for ext in ("md", "tex", "csv")]
    if plots:
        stale += [f"figures/{n}.{ext}" for n in PLOTS if n not in rep.figures for ext in ("png", "svg")]
    gone = [out / rel for rel in stale if (legacy or rel in earlier) and (out / rel).is_file()]
    for p in gone:
        p.unlink()
    now = {f"tables/{n}.{ext}" for n in written for ext in ("md", "tex", "csv")}
    now |= {f"figures/{n}.{ext}" for n, fmts in rep.figures.items() for ext in fmts} if plots else \
        {rel for rel in earlier if rel.startswith("figures/") and (out / rel).is_file()}  # figures left as they were
    atomic_write(out / MANIFEST, json.dumps(sorted(now), indent=1))
    return gone


def _manifest(out: Path) -> set[str]:
    """The files an earlier report into `out` wrote (none when no report did, or its list is unreadable)."""
    try:
        listed = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {x for x in listed if isinstance(x, str)} if isinstance(listed, list) else set()


def render_report(paths: list[Path], out: Path, convention: str = "paper", bandwidth_gbit: float = 100.0,
                  html: bool = True, plots: bool = True, model: str | None = None, baseline: str = "unpruned") -> Report:
    """Tables (grouped by model) and, with `plots`, figures of one model: records of several models
    need `model` (a model name or config name) or `plots=False`. Failed-cell notes in `paths` become
    entries of `Report.missing`; they do not stop the report."""
    col = collect(paths)
    skipped = col.skipped  # kept across --model selection
    if not col.all:
        raise ReportError("no records to report")
    if model is not None:
        col = select_model(col, model)
    check_baseline(col, baseline)
    if plots:
        require_one_model(col)
    rep = Report(out)
    rep.tables, rep.missing = build_tables(col, convention, bandwidth_gbit, baseline)
    rep.missing = [f"record {why}" for why in skipped] + failure_notes(paths, col) + figure_failure_notes(col) + rep.missing \
        + bandwidth_note(col, bandwidth_gbit)
    legacy = (out / "report.md").is_file() and not (out / MANIFEST).exists()  # an earlier version's report
    for t in rep.tables:
        for ext, fn in (("md", to_markdown), ("tex", to_latex), ("csv", to_csv)):
            atomic_write(out / "tables" / f"{t.attrs['name']}.{ext}", fn(t) if ext != "md" else fn(t) + "\n")
    atomic_write(out / "report.md", rep.markdown)
    if plots:
        from reports.plots import PLOTS, figure_tasks, save_plots

        rep.figures = save_plots(col, out / "figures", convention, rep.missing)
        rep.missing += [f"figure {name}: no data in these records" for name in PLOTS if name not in rep.figures]
        shared, left_out = figure_tasks(col)
        if left_out:  # a task some records lack is left out of every figure's average, not those records
            rep.missing.append(f"figures: scores averaged over the {len(shared)} task(s) every record scored "
                               f"({', '.join(shared) or 'none'}); left out: {', '.join(left_out)}")
    remove_stale_outputs(out, rep, plots, legacy)
    if html:
        from reports.html import render_html
        from reports.plots import PLOTS

        titles = {k: v[0] for k, v in PLOTS.items()}
        page = render_html(col, rep.tables, rep.figures, titles, rep.missing, [str(p) for p in paths], model)
        atomic_write(out / "report.html", page)
    return rep
