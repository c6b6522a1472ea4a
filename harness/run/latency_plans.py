"""`latency --plans-from`: the disaggregated plans a quality run stored, read back to be timed (a plan searched on
real weights replayed on a random-weight shape of the same depth), each checked against the model's depth, the
method's options and its plug-in's code."""

from __future__ import annotations

from pathlib import Path

from harness.config import sweep_base
from harness.errors import UsageError
from harness.pd.plan import PruningPlan
from harness.store import records as rec
from methods.base import refuse_too_deep


def replayed_plans(plans_from: str, n_layers: int, methods: dict) -> dict[str, PruningPlan]:
    """The disaggregated plans of `methods` (name -> Method) stored in `plans_from`'s records, checked against the
    model's layer count and the methods' options (a plan made with other options would be labelled with these).
    A method whose plan needs state the record lacks (`needs_replan_on_resume`) is left out: it plans afresh."""
    from harness.run.reuse import options_diff, options_then, other_code, with_defaults

    folder = Path(plans_from)
    if not folder.is_dir():
        raise UsageError(f"--plans-from {plans_from}: not a folder of run records")
    out, found = {}, []
    for path in sorted(p for p in folder.glob("*__*.json") if rec.is_record_file(p)):
        try:
            found.append(rec.load(path))
        except rec.RecordError as e:  # another cell's unreadable record is not this run's to refuse (as a quality run)
            if path.name in {rec.record_filename(m, "disaggregated") for m in methods}:
                raise UsageError(f"--plans-from: {e}; remove that file or pick another run folder") from None
    own = {r.method for r in found if r.mode == "disaggregated"}
    for r in found:
        # a method's own record, else a swept variant of it (`tail@k=1` for `--methods tail --set tail.k=1`, as a
        # quality run's --plans-from finds it: the method planned afresh beside the very plan it asked to replay)
        name = r.method if r.method in methods else sweep_base(r.method)
        if r.mode != "disaggregated" or name not in methods or name in out or (name != r.method and name in own):
            continue  # other records are not this run's to read
        method = methods[name]
        if method.needs_replan_on_resume():  # e.g. a trained FFN or healed blocks: not in the record
            continue
        then, now = options_then(method, r), with_defaults(method, method.options())
        if then != now and name != r.method:
            continue  # another variant of the sweep
        try:
            plan = PruningPlan.from_dict(r.plan)
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"--plans-from: {r.method}'s plan is not valid ({type(e).__name__}: {e})") from None
        if plan.n_layers != n_layers:
            raise UsageError(_depth_mismatch(folder, r, plan.n_layers, n_layers))
        if edited := other_code(r, method):
            raise UsageError(f"--plans-from {plans_from}: {r.method}'s plan was made by other code of its plug-in "
                             f"({', '.join(edited)} changed since); plan afresh without --plans-from")
        if then != now:
            diff = options_diff(then, now, "there", "here")
            raise UsageError(f"--plans-from {plans_from}: {r.method}'s plan was made with other options ({diff}); give "
                             "the same --set options, or plan afresh without --plans-from")
        out[name] = plan.replace(method=name) if plan.method != name else plan
    return out


def plans_to_time(plans_from: str | None, n_layers: int, methods: dict) -> dict[str, PruningPlan]:
    """The replayed plans (`replayed_plans`; none without `--plans-from`), once the methods that plan here have had
    their counts checked against `n_layers` (`methods.base.refuse_too_deep`): what a latency run knows before any
    method plans. The CLI calls it with the config's depth, before the weights load."""
    replay = replayed_plans(plans_from, n_layers, methods) if plans_from else {}
    refuse_too_deep({name: m for name, m in methods.items() if name not in replay}, n_layers)
    return replay


def not_replayed(method, plans_from: str) -> str:
    """Why `method` found no plan to replay in `plans_from` (`replayed_plans` left it out), for the run's line."""
    if method.needs_replan_on_resume():  # its record may well be there: what it plans with is not
        return f"its plan in --plans-from {plans_from} is not replayed: it plans with trained state no record keeps"
    return f"no disaggregated plan to replay in --plans-from {plans_from}"


def _depth_mismatch(folder: Path, r: rec.RunRecord, plan_layers: int, n_layers: int) -> str:
    """What is wrong with replaying `r`'s plan of `plan_layers` layers on a model of `n_layers`, and what would be
    right: a model of the plan's depth (the record's own, or a random preset of that depth), or planning afresh."""
    from harness.pd.models import PRESETS

    made_on = r.config.get("model")
    same_depth = [f"random:{p}" for p, shape in sorted(PRESETS.items()) if shape["num_hidden_layers"] == plan_layers]
    models = ", ".join(f"--model {m}" for m in dict.fromkeys([made_on, *same_depth]) if m)
    made = f" ({made_on})" if made_on else ""
    fits = f" ({models})" if models else ""
    return (f"--plans-from {folder}: {r.method}'s plan ({folder / r.filename}) is for a {plan_layers}-layer model{made}, "
            f"this model has {n_layers} layers; replay it on a {plan_layers}-layer model{fits}, or plan afresh without "
            "--plans-from")
