"""`python -m harness report`: tables, plots and an HTML page from run records."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli.flags import Parser, positive_float, user_dir
from harness.errors import UsageError


def report_parser() -> argparse.ArgumentParser:
    from reports.collect import CONVENTIONS

    p = Parser(
        prog="python -m harness report",
        description="Render stored run records as paper-style tables (Markdown, LaTeX booktabs, CSV), plots (PNG, SVG) "
        "and one self-contained HTML report. Reads records only: no model, no torch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m harness report results/issue3/default results/issue4/cpu_smollm2 --out reports/out\n"
        "  python -m harness report results/runs/RUN --metric-convention acc --bandwidth 400",
    )
    p.add_argument("results", nargs="+", type=user_dir, metavar="RESULTS_DIR", help="folders (searched recursively) or record files")
    p.add_argument("--out", type=user_dir, default=None,
                   help="output folder (default: RESULTS_DIR/report, next to the first results folder's records; for a "
                        "reference folder of `check`: reports/out/NAME, so the references stay records only)")
    p.add_argument("--metric-convention", default="paper", metavar="NAME",
                   help=f"metric per task: {', '.join(CONVENTIONS)} (default: paper = acc_norm for HellaSwag, ARC-Challenge, "
                        "OpenBookQA; acc elsewhere)")
    p.add_argument("--bandwidth", type=positive_float, default=100.0, help="link bandwidth in Gbit/s for E2E in the efficiency table (default: 100)")
    p.add_argument("--baseline", default="unpruned", metavar="METHOD",
                   help="the method every other is compared with on the same items in the 'paired' table: score difference "
                        "with a paired bootstrap 95%% CI and, for accuracies, an exact McNemar p-value (default: unpruned)")
    p.add_argument("--no-plots", action="store_true", help="tables only (faster)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="only this model's records (its name as the tables show it, or its config name, e.g. smollm2-135m); "
                        "the figures need one model when the records hold several")
    return p


def cmd_report(argv: list[str] | argparse.Namespace) -> int:
    args = argv if isinstance(argv, argparse.Namespace) else report_parser().parse_args(argv)  # a spec section: options
    from harness.store import lock
    from harness.store.records import check_writable
    from reports.collect import ReportError
    from reports.render import render_report

    if args.out is None:  # next to the records it reads (a spec or --out names another place)
        from harness.store.references import KINDS, is_reference_folder

        first = Path(args.results[0]).resolve()  # `.` and a record file name no folder
        base = first if first.is_dir() else first.parent
        args.out = base / "report"
        kinds = (base, base.parent) if base.name in KINDS else (base,)  # the references, or one kind of them
        ref = next((f for f in kinds if is_reference_folder(f)), None)
        if ref is not None:  # references stay records only, or `check --update` refuses them
            root = ref.parent if Path.cwd().resolve().is_relative_to(ref) else Path()  # not in them via the cwd either
            args.out = root / "reports" / "out" / "-".join(p.name for p in dict.fromkeys((ref, base)))
    check_writable(args.out, "--out")
    try:
        with lock.hold(args.out, lock.REPORT):  # two reports into one folder would mix their files
            rep = render_report(args.results, args.out, args.metric_convention, args.bandwidth, plots=not args.no_plots,
                                model=args.model, baseline=args.baseline)
    except ReportError as e:
        raise UsageError(str(e)) from None
    print(rep.markdown)
    for m in rep.missing:
        print(f"note: {m}", file=sys.stderr)
    for folder, who in dict.fromkeys(w for p in args.results for w in lock.writers_under(p)):
        # records are written whole, so the report is sound, but it silently showed some of a run's cells
        print(f"note: {folder} is being written by another harness process ({who}); this report holds the records "
              "it had finished, so rerun the report when that process ends", file=sys.stderr)
    # with --no-plots, figures an earlier report wrote stay in figures/: '0 figures in figures/' read as none there
    figures = "no figures rendered (--no-plots)" if args.no_plots else f"{len(rep.figures)} figures in {args.out / 'figures'}"
    print(f"tables in {args.out / 'tables'} (md, tex, csv); {figures}; HTML: {args.out / 'report.html'}", file=sys.stderr)
    return 0
