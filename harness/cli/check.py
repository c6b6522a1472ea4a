"""`python -m harness check`: the regression check of records against a reference."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from pathlib import Path

from harness.cli.flags import Parser, nonneg_float, user_dir
from harness.cli.latency import cmd_latency
from harness.cli.run import cmd_run
from harness.errors import UsageError
from harness.store.regress import RATIO_TOLERANCE

# How long a check waits for a `check --update` that is replacing the references (and an update for the
# checks reading them) before it gives up: an update holds its lock only to copy, verify and swap the records.
LOCK_WAIT_S = 60.0


def check_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m harness check",
        description="Regression check: rerun the CI spec and compare with reference records. Fails (exit 1) when KV bytes "
        "differ at all, a score moves by more than max(3 × stderr, 0.5 points), a plan's layer sets change, or a plan's "
        "TTFT or TPOT relative to the unpruned plan of the same run worsens beyond --latency-tolerance (when those "
        "ratios are the only failures, the latency section is measured once more and the second measurement decides). "
        "Absolute milliseconds are printed as notes, never compared.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m harness check --against results/reference\n"
        "  python -m harness check --against results/reference --update     # refresh the references on purpose",
    )
    p.add_argument("--against", type=user_dir, required=True, metavar="REF_DIR", help="reference records, e.g. results/reference")
    p.add_argument("--spec", type=user_dir, default=None, help="spec to rerun (default: configs/ci.toml)")
    p.add_argument("--current", type=user_dir, default=None, metavar="DIR",
                   help="compare these records instead of rerunning (e.g. a rerun made earlier)")
    p.add_argument("--out", type=user_dir, default=None, help="where the rerun writes (default: results/runs/check-<time>)")
    p.add_argument("--latency-tolerance", type=nonneg_float, default=RATIO_TOLERANCE,
                   help="allowed worsening of a plan's TTFT/TPOT (fastest repeat) ÷ the unpruned plan's (same run), as a fraction of "
                   f"the reference ratio (default: {RATIO_TOLERANCE} = {1 + RATIO_TOLERANCE:g}×)")
    p.add_argument("--update", action="store_true", help="replace the references with the rerun's records (on purpose only)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars in the rerun")
    return p


def cmd_check(argv: list[str]) -> int:
    args = check_parser().parse_args(argv)
    _check_args(args)
    current, spec, outs, hint = args.current, None, None, None
    if current is None:
        rerun = _rerun(args)
        if isinstance(rerun, int):  # the rerun failed or was interrupted: its exit status
            return rerun
        current, spec, outs, hint = rerun
    else:
        _check_current(args, current)
    if args.update:
        return _update(args.against, current)
    res = _compare(args.against, current, args.latency_tolerance)
    if args.current is None and res.only_timing and "latency" in spec.sections:
        try:
            res = _remeasure(args, spec, outs, res)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {hint}", file=sys.stderr)
            return 130
    for line in res.failures:
        print(f"FAIL  {line}")
    for line in res.notes:
        print(f"note  {line}")
    verdict = "passed" if res.ok else f"FAILED ({len(res.failures)} difference(s))"
    print(f"regression check {verdict}: {res.compared} record(s) of {current} compared with {args.against}")
    return 0 if res.ok else 1


def _check_args(args: argparse.Namespace) -> None:
    """The flags checked before any rerun (UsageError, exit 2); `args.spec` gets its default."""
    from harness.store.folders import refuse_file
    from harness.store.records import record_files_under

    if args.latency_tolerance < 0:
        raise UsageError(f"--latency-tolerance {args.latency_tolerance}: must be >= 0")
    given = [flag for flag, v in (("--spec", args.spec), ("--out", args.out)) if v is not None]
    if args.current is not None and given:  # else silently unused
        raise UsageError(f"{' and '.join(given)} with --current: --current compares records made earlier, and "
                         f"{' and '.join(given)} {'are' if len(given) > 1 else 'is'} for a rerun; give one or the other")
    if args.out is not None:  # else the rerun's run section refused --out/quality, after the spec had started
        refuse_file(args.out, "--out", "give a new folder for the rerun")
    args.spec = args.spec or Path("configs") / "ci.toml"
    if args.current is None and not args.spec.is_file():  # e.g. an installed package used outside its checkout
        raise UsageError(f"--spec {args.spec}: no such file in {Path.cwd()}; check reruns the repository's CI spec "
                         "(configs/ci.toml) and compares it with its references (results/reference): run it from the "
                         "repository's root, or give --spec FILE (or --current DIR to compare records made earlier)")
    if not args.update:
        _recover(args.against)
    if args.against.exists() and not args.against.is_dir():  # "create it with --update" would not do for a file
        raise UsageError(f"--against {args.against}: a file, not a folder of reference records; give the references' "
                         "folder (e.g. results/reference)")
    if not args.update and not args.against.is_dir():
        raise UsageError(f"--against {args.against}: no such folder of reference records "
                         f"(create it with: python -m harness check --against {args.against} --update)")
    if not args.update and not record_files_under(args.against):  # before a rerun of minutes that could only fail
        raise UsageError(f"--against {args.against}: holds no reference records (<method>__<mode>.json); give the "
                         f"references' folder (e.g. results/reference), or create them with: python -m harness check "
                         f"--against {args.against} --update")


def _rerun(args: argparse.Namespace):
    """Rerun the spec into a new folder: (that folder, the spec, its sections' folders, the hint an interrupt gives),
    or the exit status of a rerun that failed or was interrupted."""
    from harness.cli.spec import load_spec, run_spec
    from harness.store.references import check_paths, refuse_nested

    current = args.out or RERUNS / f"check-{time.strftime('%Y%m%d-%H%M%S')}"  # the name _claim makes unique
    refuse_nested(args.against, current, "--out", same_ok=False)
    _refuse_earlier_work(current)
    if args.update:
        check_paths(args.against, current)  # before a rerun of minutes
    spec = load_spec(args.spec, flag="--spec")
    if "run" not in spec.sections and "latency" not in spec.sections:
        raise UsageError(f"--spec {args.spec}: no [run] or [latency] section, so nothing to rerun; give a spec that "
                         "has one (default: configs/ci.toml), or compare records made earlier with --current DIR")
    current = current if args.out else _claim(current)  # after the refusals above: no empty folder left by them
    outs = {"run": current / "quality", "latency": current / "latency"}
    # not "rerun the same command": a check refuses an --out holding earlier work (_refuse_earlier_work)
    hint = (f"a check does not resume, so run it again{' into a new --out' if args.out else ''}; {current} keeps the "
            f"partial rerun (compare what it holds with --current {current})")
    try:
        rc = run_spec(spec, {"run": cmd_run, "latency": cmd_latency}, outs=outs, quiet=args.quiet, interrupt_hint=hint)
    except KeyboardInterrupt:  # the latency section, or between sections
        print(f"\ninterrupted: {hint}", file=sys.stderr)
        return 130
    except UsageError:  # a section refused before it wrote anything: the folder _claim made goes too
        if args.out is None:  # an --out of the user's own stays
            with contextlib.suppress(OSError):
                current.rmdir()
        raise
    return rc if rc != 0 else (current, spec, outs, hint)


def _check_current(args: argparse.Namespace, current: Path) -> None:
    """`--current`: a folder of run records (for `--update`, one the references can be refreshed from)."""
    from harness.store.records import record_files_under, unfinished_hint
    from harness.store.references import check_paths, refuse_nested

    if not current.is_dir():
        raise UsageError(f"--current {current}: {'a file, not a folder of run records' if current.exists() else 'no such folder'}")
    if not args.update and not record_files_under(current):  # else a "regression" of N differences, exit 1
        raise UsageError(f"--current {current}: holds no run records (<method>__<mode>.json){unfinished_hint(current)}; "
                         "give the folder of a check's rerun (results/runs/check-...) or of a run")
    if args.update:  # the folders now; what the records would lose or corrupt is refused by the update, which reads
        check_paths(args.against, current)  # them once, under its lock, before anything is touched (`_update`)
    else:
        refuse_nested(args.against, current)


RERUNS = Path("results") / "runs"


def _claim(path: Path) -> Path:
    """A new folder for a check's rerun: `path` (check-<time>), else `path-2`, `path-3`, ... Made here, so that it is
    this check's alone: two checks started in the same second both reran into one check-<time>, and the second
    was refused on the first's lock (exit 2)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        folder = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            folder.mkdir()  # atomic: of two checks making one name, the second gets FileExistsError and the next name
            return folder
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def _remeasure(args: argparse.Namespace, spec, outs: dict[str, Path], first):
    """Measure the latency section once more when its ratios alone failed, and judge by that measurement.

    Why: each plan's fastest of the spec's repeats is compared, in interleaved rounds, yet another job that keeps
    the 2 cores busy in bursts (a test suite beside the check) moved a plan's ratio to 2.7x the reference's while
    every plan, byte and score matched. A plan that really got slower is slower again; a burst rarely lands on
    the same plan twice. The first measurement is kept beside the rerun, and the verdict says there were two."""
    from harness.cli.spec import run_spec

    current = outs["latency"].parent
    kept = current.with_name(f"{current.name}.latency-first")  # outside: two records of a cell there fail the check
    n = 1
    while kept.exists():  # an earlier check's, into an --out since removed
        n += 1
        kept = current.with_name(f"{current.name}.latency-first-{n}")
    outs["latency"].rename(kept)
    print(f"note  latency ratios only beyond the tolerance ({first.slower_ratios}); measuring the latency section "
          f"once more (the first measurement kept in {kept}):", file=sys.stderr, flush=True)
    for line in first.failures:
        print(f"      first: {line}", file=sys.stderr)
    rc = run_spec(spec, {"latency": cmd_latency}, outs=outs, quiet=args.quiet)
    if rc != 0:
        first.failures.append(f"the latency section's second measurement failed (exit {rc})")
        return first
    res = _compare(args.against, current, args.latency_tolerance)
    res.notes.append(f"latency measured twice: the first measurement's ratios were beyond the tolerance "
                     f"({first.slower_ratios}; kept in {kept}); the verdict is the second's")
    return res


def _refuse_earlier_work(out: Path) -> None:
    """A rerun into a folder holding an earlier run's records or resume states would reuse them (run keys name the
    configuration, not the code), so the check would compare, or --update install, numbers this code never made."""
    from harness.store.records import run_files_under

    earlier = sorted(str(p.relative_to(out)) for p in run_files_under(out)) if out.is_dir() else []
    if earlier:
        shown = ", ".join(earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
        raise UsageError(f"--out {out}: holds the work of an earlier run ({shown}), which the rerun would reuse instead "
                         "of computing it with this code; give a new --out, or compare those records as they are with "
                         f"--current {out}")


def _compare(reference: Path, current: Path, tolerance: float):
    """`regress.check` under a shared lock beside the references: a `check --update` swapping them in
    finishes first (we wait for it), so the check reads the old set or the new one, never a mix."""
    from harness.store import lock
    from harness.store.regress import check

    _recover(reference)  # an update killed during our rerun
    with lock.hold_beside(reference, shared=True, wait=LOCK_WAIT_S):
        return check(reference, current, tolerance)


def _recover(reference: Path) -> None:
    """Put back references that a killed `check --update` left half swapped (`.<name>.old` beside them)."""
    from harness.store import lock
    from harness.store.files import backup_path, recover_swap

    if backup_path(reference.resolve()).exists():
        with lock.hold_beside(reference, wait=LOCK_WAIT_S):  # an update running now finishes its swap first
            recover_swap(reference)


def _update(reference: Path, current: Path) -> int:
    """Replace the references by the rerun's records: built beside them, verified, then swapped in."""
    from harness.store import lock
    from harness.store.references import update_references

    with lock.hold_beside(reference, wait=LOCK_WAIT_S):  # a check reading them finishes first
        n = update_references(reference, current)
    print(f"references refreshed: {reference} now holds the {n} record(s) of {current}")
    return 0
