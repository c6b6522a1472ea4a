"""Paper-style tables from run records: quality, long-context (efficiency: `reports.efficiency`; plans: `reports.plans`).

Each builder returns a table as tidy pandas cells (`reports.formats.make_table`); render it with
`to_markdown`, `to_latex`, `to_csv` or `to_html` from `reports.formats`. What the figures read from a record too
(blocks removed, a score, KV bytes sent, a latency workload) is in `reports.record_values`. Only records are read (no
model, no torch).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import pandas as pd

from harness.store.records import LOWER_IS_BETTER, RunRecord, is_long_task, stored_presentation, task_presentation
from harness.store.task_names import TaskPresentation
from reports.collect import CONVENTION_TEXT, Collection, differing_settings, is_latency, metric_for, natural_key, own_metrics, reference
from reports.formats import CellSpec, bold_best, bold_beyond_noise, cell, make_table
from reports.record_values import MIB, MODE_ORDER, MODE_TITLE, kv_sent, ordered_tasks, parse_workload, removed_counts, se_of_mean, stored_score

TASK_TITLE = {"arc_challenge": "ARC-c", "arc_easy": "ARC-e", "boolq": "BoolQ", "hellaswag": "HellaSwag",
              "openbookqa": "OBQA", "piqa": "PIQA", "winogrande": "WinoGrande", "mmlu": "MMLU",
              "wikitext": "WikiText-2", "lambada_openai": "LAMBADA"}


def mib_text(nbytes: float, decimals: int) -> str:
    """Bytes as MiB with `decimals` decimals, or two significant digits where that would print 0 (a tiny model's
    3,072-byte handoff showed as a bold 0.00)."""
    mib = nbytes / MIB
    return f"{mib:.2g}" if 0 < abs(mib) < 0.5 * 10 ** -decimals else f"{mib:,.{decimals}f}"


def mib_decimals(nbytes: Iterable[float | None], decimals: int) -> int:
    """`decimals` for a column of byte counts, or, where its smallest nonzero value would print as 0 with them (and
    `mib_text` would give it two significant digits), the decimals that give it two: every value of the column then
    shows with the same decimals (a tiny model's column read 0.1 beside 0.047 (1.33×), each rounded its own way)."""
    small = min((abs(b) / MIB for b in nbytes if b), default=None)
    if small is None or small >= 0.5 * 10 ** -decimals:
        return decimals
    return min(1 - math.floor(math.log10(small)), 6)


def task_title(task: str, records: Sequence[RunRecord] = ()) -> str:
    """`task`'s column title: the one its records stored (`lm_eval.task_titles`: a plug-in lm-eval task's `title`; the
    least where they disagree, whatever the input order), else `TASK_TITLE`'s (the package's tasks), else its name."""
    stored = {x for r in records if isinstance(x := (r.lm_eval.get("task_titles") or {}).get(task), str) and x.strip()}
    return min(stored) if stored else TASK_TITLE.get(task, task)


def _as_collection(records: Collection | Sequence[RunRecord]) -> Collection:
    if isinstance(records, Collection):
        return records
    col = Collection()
    for i, r in enumerate(records):
        (col.latency if is_latency(r) else col.quality).append(r)
        col.sources[id(r)] = __import__("pathlib").Path(f"record{i}") / r.filename
    return col


def removed_text(r: RunRecord) -> str:
    """'8' when both stages remove the same number of blocks, else 'prefill / decode' counts."""
    kp, kd = removed_counts(r)
    return str(kd) if kp == kd else f"{kp} / {kd}"


def _row_key(col: Collection, r: RunRecord) -> tuple:
    kp, kd = removed_counts(r)
    return (kd, kp, r.method != "unpruned", natural_key(col.label(r)))


def _groups(col: Collection, records: list[RunRecord], with_mode: bool = True) -> list[tuple[str, list[RunRecord]]]:
    """Records grouped by model (and PD setting), in a stable order; titles name the model only
    when there are several."""
    models = sorted({col.model(r) for r in records})
    out = []
    for m in models:
        for mode in sorted({r.mode for r in records}, key=lambda x: MODE_ORDER.get(x, 9)) if with_mode else [None]:
            rs = [r for r in records if col.model(r) == m and (mode is None or r.mode == mode)]
            if rs:
                title = " · ".join(x for x in ((m if len(models) > 1 else ""), MODE_TITLE.get(mode, mode or "")) if x)
                out.append((title, sorted(rs, key=lambda r: _row_key(col, r))))
    return out


def _fmt(v: float | None, metric: str, se: float | None = None) -> CellSpec:
    """A score (×100 for accuracies) with its standard error, when known, as '45.0 ± 5.0'."""
    return _fmt_as(v, "decimal" if metric in LOWER_IS_BETTER else "percent", se)


def _items_text(records: list[RunRecord], tasks: list[str]) -> str:
    per = {t: sorted({r.n_samples.get(t) for r in records if t in r.n_samples and r.n_samples.get(t)}) for t in tasks}
    uniq = {tuple(v) for v in per.values()}
    if len(uniq) == 1 and len(next(iter(uniq))) == 1:
        return f"{next(iter(uniq))[0]} items per task"
    return "items per task: " + ", ".join(f"{task_title(t, records)} {'/'.join(map(str, v))}" for t, v in per.items())


def _avg_cell(accs: list[float], ses: list[float | None], n_acc: int) -> tuple[CellSpec, float | None]:
    """The average over the accuracy columns, with the standard error of that mean; '—' unless every
    accuracy column has a value."""
    if not accs or len(accs) != n_acc:
        return cell("—"), None
    avg = sum(accs) / len(accs)
    se = se_of_mean(ses)
    return cell(f"{avg:.1f}" + (f" ± {se:.1f}" if se is not None else ""), round(avg, 6),
                stderr=None if se is None else round(se, 6)), se


def _quality_row(col: Collection, r: RunRecord, dense: RunRecord | None, tasks: list[str], convention: str,
                 metrics: dict[str, set[str]]) -> tuple[list[CellSpec], dict[str, float]]:
    """One record's cells and the standard errors of its score cells (table units), by column key."""
    row, accs, ses, noise = [cell(col.label(r)), cell(removed_text(r))], [], [], {}
    for t in tasks:
        m = metric_for(t, r.scores.get(t, {}), convention, r)
        v, se = stored_score(r, t, m)
        row.append(_fmt(v, m or "acc", se))
        if se is not None:
            noise[t] = se if m in LOWER_IS_BETTER else 100 * se
        if v is not None and m not in LOWER_IS_BETTER:
            accs.append(100 * v)
            ses.append(None if se is None else 100 * se)
    avg, avg_se = _avg_cell(accs, ses, sum(1 for t in tasks if not (metrics[t] & LOWER_IS_BETTER)))
    if avg_se is not None:
        noise["Avg"] = avg_se
    shared = [t for t in tasks if dense is not None and _handed_over(dense, t) and _handed_over(r, t)]  # folders may differ in tasks
    return [*row, avg, _ratio_cell(kv_sent(dense, shared), kv_sent(r, shared))], noise


def _handed_over(r: RunRecord, task: str) -> bool:
    """Whether `r` sent KV for `task`: a task of zero items has a kv entry of zero handoffs, which would count the other
    record's bytes against none."""
    return task in r.kv and r.kv[task].get("handoffs", 1) > 0


# how `reports.formats.bold_beyond_noise` combines two rows' standard errors, for the captions
COMBINED_SE_TEXT = ("(the root of the sum of the two squared standard errors, as for independent samples; rows scored on "
                    "the same items are not, so this is conservative: the paired table tests a difference)")


def _quality_caption(col: Collection, recs: list[RunRecord], tasks: list[str], convention: str) -> str:
    model = ", ".join(sorted({col.model(r) for r in recs})) or "—"
    lm_eval = sorted({str(r.lm_eval.get("version")) for r in recs if r.lm_eval.get("version")})
    seeds = sorted({str(r.config.get("seed")) for r in recs})
    shots = sorted({int(r.config.get("num_fewshot") or 0) for r in recs}) or [0]
    shot_text = "Zero-shot" if shots == [0] else f"{'/'.join(map(str, shots))}-shot"
    own = own_metrics(tasks, recs) if convention == "paper" else {}  # a plug-in task's table metric, from its records
    own_text = "; " + ", ".join(f"{m} for {task_title(t, recs)}" for t, m in own.items()) + " (the task's own)" if own else ""
    return (f"{shot_text} scores (%) on {model}; rows grouped by PD setting and blocks removed "
            f"(one number: both stages; 'p / d': prefill / decode). Metric: {CONVENTION_TEXT[convention]}{own_text} "
            f"(convention '{convention}'). {_items_text(recs, tasks)}; lm-eval {', '.join(lm_eval) or '—'}, "
            f"seed {', '.join(seeds)}. Avg: mean over the accuracy columns. KV ×: KV bytes unpruned ÷ method, summed over "
            f"the handoffs of these tasks both scored (disaggregated only). ± : standard error (lm-eval's; Avg: of the mean over tasks, "
            f"the root of the sum of the tasks' squared standard errors over their number, tasks taken as independent). "
            f"Bold: best per column only where it beats the runner-up by more than 1.96 combined standard errors {COMBINED_SE_TEXT}."
            f"{_mixed_text(recs)}")


def _mixed_text(recs: list[RunRecord]) -> str:
    """A caption's warning when its rows were not run alike (they still share groups, averages and bold)."""
    differ = differing_settings(recs)
    if not differ:
        return ""
    return (" Rows were run with different settings, compared side by side: "
            + "; ".join(f"{k} {' / '.join(v)}" for k, v in differ.items())
            + " (each KV × is against the unpruned record of the row's own settings).")


def quality_table(records: Collection | Sequence[RunRecord], convention: str = "paper") -> pd.DataFrame:
    """Rows: methods grouped by model and blocks removed; columns: the multiple-choice tasks and
    their average; one block per PD setting. Scores ×100 ± stderr; bold only beyond noise."""
    col = _as_collection(records)
    recs = col.quality
    tasks = ordered_tasks(recs, lambda r, t: not is_long_task(r, t))
    if not tasks:  # long-context tasks only: their own table shows them, with the KV bytes
        return make_table("quality", "", ["Method"], [])
    # each column's metrics over all rows first: a row's Avg counts the accuracy columns, whatever the row order
    metrics = {t: {m for r in recs if (m := metric_for(t, r.scores.get(t, {}), convention, r))} for t in tasks}
    groups, noise, i = [], {name: {} for name in [*tasks, "Avg"]}, 0  # noise[column][row] = stderr, table units
    for title, rs in _groups(col, recs):
        g: list[list[CellSpec]] = []
        for r in rs:  # KV × against the unpruned record of r's own configuration (collect.reference)
            row, ses = _quality_row(col, r, reference(rs, r, col=col), tasks, convention, metrics)
            g.append(row)
            for key, se in ses.items():
                noise[key][i] = se
            i += 1
        groups.append((title, g))
    names = [_column_name(t, metrics[t], recs) for t in tasks]
    t = make_table("quality", _quality_caption(col, recs, tasks, convention), ["Method", "Removed", *names, "Avg", "KV ×"], groups)
    for name, task in zip(names, tasks):
        bold_beyond_noise(t, name, noise[task], lower_is_better=bool(metrics[task] & LOWER_IS_BETTER))
    bold_beyond_noise(t, "Avg", noise["Avg"])
    bold_best(t, "KV ×")  # bytes are counted, not sampled
    return t


def _column_name(task: str, metrics: set[str], records: list[RunRecord]) -> str:
    """A task's column title (`task_title`); a lower-is-better column (WikiText-2) names its metric and direction, as
    it is no %."""
    low = sorted(metrics & LOWER_IS_BETTER)
    return task_title(task, records) + (f" ({low[0].replace('_', ' ').replace('perplexity', 'ppl')} ↓)" if low else "")


def hardware(r: RunRecord) -> str:
    env = r.environment
    if env.get("gpu_name"):
        return str(env["gpu_name"])
    cpu = env.get("cpu_model") or env.get("cpu") or "cpu"
    return f"CPU {cpu}, {env.get('cpu_threads', '?')} threads"


def latency_groups(col: Collection) -> list[tuple[str, str, list[RunRecord]]]:
    """(title, workload, its records in row order) per hardware, model and workload: the latency tables' groups."""
    keys = sorted({(hardware(r), col.model(r), lab) for r in col.latency for lab in r.latency if parse_workload(lab)},
                  key=lambda k: (k[0], k[1], parse_workload(k[2])))
    out = []
    for hw, model, lab in keys:
        T, n, b, mode = parse_workload(lab)
        rs = sorted([r for r in col.latency if hardware(r) == hw and col.model(r) == model and lab in r.latency],
                    key=lambda r: _row_key(col, r))
        out.append((f"{model} · prompt {T}, decode {n}, batch {b}, {mode} decode · {hw}", lab, rs))
    return out


def clocks(col: Collection) -> str:
    """The clocks the latency records were measured with, for a caption."""
    return ", ".join(sorted({str(r.extra.get("clock")) for r in col.latency if r.extra.get("clock")})) or "—"


def _ratio_cell(num: float | None, den: float | None) -> CellSpec:
    if num is None or den is None or den == 0:
        return cell("—")
    x = num / den
    return cell(f"{x:.2f}×", round(x, 6))


def _per_request(r: RunRecord, task: str, setting: str) -> float | None:
    kv = r.extra.get("kv_by_setting", {}).get(task, {}).get(setting)
    return kv["kv_bytes"] / kv["handoffs"] if kv and kv.get("handoffs") else None


def _long_tasks(recs: list[RunRecord]) -> dict[str, TaskPresentation]:
    """Long-context task -> its presentation, in column order. A presentation stored with a record
    (the first one found) wins over the legacy fallback for records older than that field."""
    found: dict[str, TaskPresentation] = {}
    for stored_only in (True, False):
        for r in recs:
            for t in r.scores:
                pres = stored_presentation(r, t) if stored_only else task_presentation(r, t)
                if pres is not None:
                    found.setdefault(t, pres)
    return dict(sorted(found.items(), key=lambda kv: (kv[1].column_order, kv[0])))


def _setting_key(setting: str) -> tuple:
    """'T2048' sorts by 2048; a setting without a number after its letter sorts after, by name."""
    return (0, int(setting[1:]), "") if setting[1:].isdigit() else (1, 0, setting)


def _long_columns(recs: list[RunRecord], tasks: dict[str, TaskPresentation]) -> list[tuple[str, str, str]]:
    """(task, metric, setting) per per-setting score, e.g. ('pd_ppl', 'ppl_T2048', 'T2048'): tasks in
    column order, settings by number."""
    cols: list[tuple[str, str, str]] = []
    for r in recs:
        for task, pres in tasks.items():
            prefix = pres.setting_prefix
            for m in r.scores.get(task, {}):
                # the setting is the prefix's last letter and what follows: ppl_T2048 -> T2048
                if m.startswith(prefix) and (task, m, m[len(prefix) - 1:]) not in cols:
                    cols.append((task, m, m[len(prefix) - 1:]))
    order = list(tasks)
    return sorted(cols, key=lambda c: (order.index(c[0]), _setting_key(c[2])))


def _fmt_as(v: float | None, metric_format: str, se: float | None = None) -> CellSpec:
    """A score in its format, 'decimal' (the value) or 'percent' (×100), with its standard error when
    known (CSV: the `<column>_stderr` column, in the same units)."""
    if v is None:
        return cell("—")
    if metric_format == "decimal":
        return cell(f"{v:.2f}" + (f" ± {se:.2f}" if se is not None else ""), v, stderr=se)
    return cell(f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if se is not None else ""), round(100 * v, 6),
                stderr=None if se is None else round(100 * se, 6))


_CAPTION_OPTION = re.compile(r"\{(\w+)(?:\|([^}]*))?\}")


def _task_caption(recs: list[RunRecord], task: str, pres: TaskPresentation) -> str:
    """The task's caption sentence with each {OPTION|DEFAULT} filled by that option's values over `recs`."""
    def fill(m: re.Match) -> str:
        values = sorted({str(r.lm_eval.get("tasks", {}).get(task, {}).get("harness_task", {}).get("options", {})
                             .get(m[1])) for r in recs if task in r.scores})
        return "/".join(values) or (m[2] or "")
    return _CAPTION_OPTION.sub(fill, pres.caption)


def _long_caption(recs: list[RunRecord], tasks: dict[str, TaskPresentation]) -> str:
    order = sorted(tasks.items(), key=lambda kv: (kv[1].column_order, kv[0]))  # the tasks shown, no other
    texts = [_task_caption(recs, t, pres) for t, pres in order if pres.caption]
    tasks_text = f"{'; '.join(texts)}. " if texts else ""  # a plug-in task may give no caption: not ". ."
    return (f"Long-context workloads. {tasks_text}"
            "KV/req: bytes the prefill stage sends per request (reduction versus unpruned in brackets; unified sends nothing). "
            "± : standard error; a score is bold only where it beats the runner-up by more than 1.96 combined standard errors "
            + COMBINED_SE_TEXT + "." + _mixed_text(recs))


def long_context_table(records: Collection | Sequence[RunRecord]) -> pd.DataFrame:
    """Per setting (prompt length) of each long-context task: its score next to the KV bytes sent per
    request (disaggregated; unified sends nothing). How a task is shown comes from its records
    (`harness.store.records.task_presentation`), so no task code is needed here."""
    col = _as_collection(records)
    recs = [r for r in col.quality if any(is_long_task(r, t) for t in r.scores)]
    tasks = _long_tasks(recs)
    cols = _long_columns(recs, tasks)
    head = ["Method", "Removed"]
    for task, _, setting in cols:
        head += [f"{tasks[task].title} {setting}", f"KV/req {setting} (MiB)"]
    groups, noise, i = [], {j: {} for j in range(len(cols))}, 0
    places = [mib_decimals((_per_request(r, task, setting) for r in recs), 1) for task, _, setting in cols]
    for title, rs in _groups(col, recs):
        g: list[list[CellSpec]] = []
        for r in rs:
            dense = reference(rs, r, col=col)  # the unpruned record of r's own configuration
            row = [cell(col.label(r)), cell(removed_text(r))]
            for j, (task, m, setting) in enumerate(cols):
                v, se = stored_score(r, task, m)
                row.append(_fmt_as(v, tasks[task].metric_format, se))
                if se is not None:
                    noise[j][i] = se if tasks[task].metric_format == "decimal" else 100 * se
                b = _per_request(r, task, setting)
                ref = _per_request(dense, task, setting) if dense else None
                row.append(cell("—") if b is None else cell(mib_text(b, places[j]) + (f" ({ref / b:.2f}×)" if ref and b else ""),
                                                            b / MIB))
            g.append(row)
            i += 1
        groups.append((title, g))
    t = make_table("long_context", _long_caption(recs, tasks), head, groups)
    for j, (task, _, _) in enumerate(cols):
        bold_beyond_noise(t, head[2 + 2 * j], noise[j], lower_is_better=tasks[task].lower_is_better)
        bold_best(t, head[3 + 2 * j], lower_is_better=True)
    return t
