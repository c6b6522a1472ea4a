"""Paired comparisons: each method against a baseline method on the same items.

Every quality record keeps its per-item numbers (`extra.items`: item ids and, per metric, one
value per item). For a method and the baseline in the same PD setting and model, the items both
scored are paired and the difference method − baseline is summarised by

- a paired bootstrap 95 % CI of the mean difference (resampling items; `scipy.stats.bootstrap`,
  percentile method, seeded), per task and for the average over tasks (each task's items
  resampled independently, the statistic is the mean of the per-task mean differences);
- for 0/1 metrics (accuracies), the exact McNemar test: a two-sided binomial test of the
  discordant pairs (`scipy.stats.binomtest`, p = 1 when there are none).

- for the average over accuracy tasks, a sign-flip permutation test stratified by task: under McNemar's
  null each discordant item's difference is +1 or −1 with equal odds, independently; the p-value of the
  average's size is exact when the sign patterns are few (counted per task), else from seeded draws.

A difference is *significant* (`*`, and the verdict) for an accuracy when the exact McNemar p < 0.05,
for the average over accuracies when the permutation p < 0.05, for other metrics when the CI excludes 0.
The exact tests decide for 0/1 metrics because the percentile bootstrap is too lenient with few
discordant items: 7 items gained and 1 lost of 100 give a CI of [+1, +12] points but p = 0.07, which
is not significant; an average over two tasks with 1 and 3 items lost (and none gained) of 20 each had a
CI of [−20, −2.5] points, starred, where the permutation p is 0.125.
"Better / same / worse" counts tasks by that rule. Every p-value is a single test's, not adjusted for the many a
table makes: the caption counts them and the stars expected by chance if no method differed from the baseline.
A record's baseline is `collect.reference`'s: the baseline record of its own configuration in its
own folder, else one that scored its tasks, else the first by path (never the order of the inputs).
Records written before per-item numbers were kept have no `extra.items`: no row for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from harness.store.records import RunRecord, is_long_task, lower_is_better
from harness.store.task_names import STANDARD_TASKS
from reports.collect import Collection, ReportError, metric_for, natural_key, reference
from reports.formats import CellSpec, cell, make_table

N_RESAMPLES = 10_000
SEED = 0
ALPHA = 0.05
N_PERMUTATIONS = 100_000  # draws of the average's sign-flip test when its sign patterns are too many to count
EXACT_MAX = 200_000  # ... and the most it counts exactly (products of per-task counts of +1 outcomes)


@dataclass(frozen=True)
class Paired:
    """One comparison: mean difference (method − baseline, in the metric's units), its 95 % CI, the
    McNemar p-value (None for non-binary metrics) and the number of paired items."""

    diff: float
    low: float
    high: float
    p_mcnemar: float | None
    n: int
    p_permutation: float | None = None  # an average over 0/1 metrics: the stratified sign-flip test's

    @property
    def significant(self) -> bool:
        """For 0/1 metrics the exact McNemar test (an average of them: the sign-flip test) at 5 %: with few discordant
        items the percentile bootstrap is too lenient (7 gained, 1 lost of 100: CI [+1, +12] points, p = 0.07).
        Otherwise the CI excludes 0."""
        p = self.p_mcnemar if self.p_mcnemar is not None else self.p_permutation
        if p is not None:
            return p < ALPHA
        return self.low > 0 or self.high < 0

    @property
    def p(self) -> float | None:
        return self.p_mcnemar if self.p_mcnemar is not None else self.p_permutation


def _ci(samples: tuple[np.ndarray, ...], statistic) -> tuple[float, float]:
    res = stats.bootstrap(samples, statistic, confidence_level=0.95, n_resamples=N_RESAMPLES, method="percentile",
                          vectorized=True, paired=False, random_state=np.random.default_rng(SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mcnemar_exact(base: np.ndarray, other: np.ndarray) -> float:
    """Exact McNemar p-value of paired 0/1 outcomes (two-sided binomial test on the discordant pairs)."""
    gained = int(np.sum((base == 0) & (other == 1)))
    lost = int(np.sum((base == 1) & (other == 0)))
    return 1.0 if gained + lost == 0 else float(stats.binomtest(gained, gained + lost, 0.5).pvalue)


def sign_flip_p(ds: tuple[np.ndarray, ...]) -> float:
    """Two-sided p-value of the mean over tasks of the per-task mean differences of paired 0/1 outcomes (each d in
    {-1, 0, +1}), under McNemar's null stratified by task: each discordant item is +1 or -1 with odds 1/2, independently.
    Exact (the per-task counts of +1 enumerated, binomial weights) up to `EXACT_MAX` combinations, else from
    `N_PERMUTATIONS` seeded draws ((hits + 1) / (draws + 1))."""
    m, n = [int(np.count_nonzero(d)) for d in ds], [len(d) for d in ds]
    observed = abs(float(np.mean([d.mean() for d in ds])))
    if not sum(m):
        return 1.0
    tol = 1e-12 * max(1.0, observed)  # equal sums reached in another order
    if np.prod([k + 1 for k in m], dtype=float) <= EXACT_MAX:
        values, probs = np.zeros(1), np.ones(1)
        for k, size in zip(m, n):
            plus = np.arange(k + 1)
            values = (values[:, None] + (2 * plus - k)[None, :] / size / len(ds)).ravel()
            probs = (probs[:, None] * stats.binom.pmf(plus, k, 0.5)[None, :]).ravel()
        return float(min(1.0, probs[np.abs(values) >= observed - tol].sum()))
    rng = np.random.default_rng(SEED)
    t = sum((2 * rng.binomial(k, 0.5, N_PERMUTATIONS) - k) / size for k, size in zip(m, n)) / len(ds)
    return float((np.count_nonzero(np.abs(t) >= observed - tol) + 1) / (N_PERMUTATIONS + 1))


def _binary(*xs: np.ndarray) -> bool:
    return all(np.isin(x, (0.0, 1.0)).all() for x in xs)


def _estimable(ds: tuple[np.ndarray, ...]) -> bool:
    """Whether a bootstrap CI means something: every sample has two items or more and no inf/NaN (one article's
    perplexity difference has no spread to resample; an infinite perplexity has no mean to bound)."""
    return all(len(d) >= 2 and np.isfinite(d).all() for d in ds)


def compare(base: np.ndarray, other: np.ndarray) -> Paired:
    """Paired comparison of one task's per-item values (same items, same order). The CI is NaN (shown "—", never
    significant) when it cannot be estimated (`_estimable`); a zero-spread difference over 2+ items is its own CI."""
    d = np.asarray(other, float) - np.asarray(base, float)
    if not _estimable((d,)):
        low = high = float("nan")
    else:
        low, high = _ci((d,), lambda x, axis: x.mean(axis=axis)) if d.std() > 0 else (float(d.mean()),) * 2
    binary = _binary(np.asarray(base), np.asarray(other))
    return Paired(float(d.mean()), low, high, mcnemar_exact(np.asarray(base), np.asarray(other)) if binary else None, len(d))


def compare_average(pairs: list[tuple[np.ndarray, np.ndarray]]) -> Paired:
    """The mean over tasks of the per-task mean differences, with each task's items resampled independently
    (a CI of NaN when any task's cannot be estimated: a task of one item has unknown noise)."""
    ds = tuple(np.asarray(o, float) - np.asarray(b, float) for b, o in pairs)
    diff, n = float(np.mean([d.mean() for d in ds])), sum(len(d) for d in ds)
    perm = sign_flip_p(ds) if all(_binary(np.asarray(b, float), np.asarray(o, float)) for b, o in pairs) else None
    if not _estimable(ds):
        return Paired(diff, float("nan"), float("nan"), None, n, perm)
    if not any(d.std() > 0 for d in ds):
        return Paired(diff, diff, diff, None, n, perm)
    low, high = _ci(ds, lambda *xs, axis: np.mean([x.mean(axis=axis) for x in xs], axis=0))
    return Paired(diff, low, high, None, n, perm)


def aligned(base: RunRecord, other: RunRecord, task: str, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The two records' values of `metric` on the items both scored (None when either lacks them); a None or NaN
    value is an item not scored."""
    a, b = (r.extra.get("items", {}).get(task) for r in (base, other))
    if not a or not b or metric not in a["metrics"] or metric not in b["metrics"]:
        return None
    va, vb = ({i: v for i, v in zip(x["ids"], x["metrics"][metric]) if v is not None and v == v} for x in (a, b))
    common = [i for i in a["ids"] if i in va and i in vb]
    if not common:
        return None
    return np.array([va[i] for i in common], float), np.array([vb[i] for i in common], float)


def _text(p: Paired, lower: bool = False) -> CellSpec:
    """Points (×100) for accuracies; a lower-is-better metric (perplexity) in its own units, as the quality table."""
    s = 1 if lower else 100
    mark = "*" if p.significant else ""
    pv = "" if p.p is None else f" p={p.p:.2g}"
    known = not (np.isnan(p.low) or np.isnan(p.high))
    ci = f"[{s * p.low:+.1f}, {s * p.high:+.1f}]" if known else "[—]"
    return cell(f"{s * p.diff:+.1f}{mark} {ci}{pv}", round(s * p.diff, 6), ci_low=round(s * p.low, 6) if known else None,
                ci_high=round(s * p.high, 6) if known else None, p_mcnemar=p.p_mcnemar, p_permutation=p.p_permutation)


def _with_bh(body: list) -> list:
    """`body` with `p_bh` beside each cell's p-value: Benjamini-Hochberg adjusted over every p-value of the table
    (`scipy.stats.false_discovery_control`), so a reader of many rows and tasks can control the false discovery rate."""
    where = {(g, i, j): p for g, (_, rows) in enumerate(body) for i, row in enumerate(rows) for j, c in enumerate(row)
             if (p := _cell_p(c[2])) is not None}
    if not where:
        return body
    adjusted = stats.false_discovery_control(np.asarray(list(where.values()), dtype=float), method="bh")
    out = [(title, [list(row) for row in rows]) for title, rows in body]
    for (g, i, j), q in zip(where, adjusted):
        text, value, st = out[g][1][i][j]
        out[g][1][i][j] = (text, value, {**st, "p_bh": float(q)})
    return out


def _cell_p(st: dict | None) -> float | None:
    """The p-value a cell of `_text` shows: `Paired.p` from the parts the cell keeps (None ones are left out)."""
    return next((st[k] for k in ("p_mcnemar", "p_permutation") if k in st), None) if st else None


def _multiplicity_text(tests: int, body: list, baseline: str) -> str:
    """The caption's words on multiplicity: the `tests` starred cells are unadjusted; the CSV's `_p_bh` adjusts the
    p-values among them (cells judged by their CI, perplexities and other non-0/1 metrics, have no p-value to adjust)."""
    m = sum(1 for _, rows in body for row in rows for c in row if c[2] and "p_bh" in c[2])
    text = (f"p-values and * are per cell, not adjusted for multiple comparisons: this table makes {tests} tests at "
            f"{ALPHA:g}, so about {tests * ALPHA:.1f} would be starred by chance if no method differed from {baseline}; ")
    if m == tests:
        return text + ("the CSV's <column>_p_bh columns hold the p-values adjusted for them together (Benjamini-Hochberg, "
                       "the false discovery rate over every p-value of the table).")
    if m == 0:
        return text + "each is judged by its CI (no p-value to adjust)."
    return text + (f"the CSV's <column>_p_bh columns hold the {m} p-values among them adjusted together (Benjamini-Hochberg, "
                   f"the false discovery rate over those {m}); the {tests - m} judged by their CI have no p-value and are "
                   "not adjusted.")


def _paired_caption(baseline: str, convention: str, tests: int, body: list, any_lower: bool) -> str:
    """The paired table's caption but for what it leaves out (`_left_out_text`)."""
    return (f"Difference to {baseline} on the same items, in points (method − {baseline}; metric as in the quality "
            f"table, convention '{convention}'): mean [paired bootstrap 95% CI, {N_RESAMPLES:,} resamples, seed {SEED}]"
            f" and, for accuracies, the exact McNemar p-value (Avg: a sign-flip permutation test stratified by task, "
            f"exact or {N_PERMUTATIONS:,} draws). * : p < {ALPHA:g} for accuracies and their Avg, else the CI excludes 0; "
            f"[—]: no CI (a single item, or an infinite value). Baseline: the {baseline} record of "
            f"the row's folder, else one with its tasks. Avg: mean of the differences over the accuracy tasks (as the "
            f"quality table's Avg: long-context tasks left out, '—' unless the row pairs on every accuracy column), "
            f"items resampled within each task. Verdict: tasks significantly better / not / worse. "
            + _multiplicity_text(tests, body, baseline)
            + (" Perplexities: in their own units, and lower is better; the difference is the mean over articles of "
               "each article's perplexity difference, not the difference of the long-context table's perplexities "
               "(exp of the mean log-loss over all their tokens)." if any_lower else ""))


def _left_out_text(baseline: str, left: dict[str, list[str]]) -> str:
    """The caption's sentences on what the table leaves out: tasks paired on fewer items than scored, tasks the baseline
    did not score, rows with no item to pair (no per-item results on one side: a record written before they were kept;
    such rows used to be left out without a word) and rows with no baseline record of their configuration; a row is
    named with its group where the table has several."""
    texts = {"partial": ("Paired on fewer items than scored: ", "; "),
             "no_base": (f"Not paired, as its {baseline} record did not score them: ", "; "),
             "no_items": (f"No item paired with its {baseline} record (per-item results missing on one side: a record "
                          "written before records kept them), so no row: ", ", "),
             "unpaired": (f"No {baseline} record of their configuration, so no row: ", ", ")}
    return "".join(f" {head}{sep.join(left[k])}." for k, (head, sep) in texts.items() if left.get(k))


def _verdict(done: dict[str, Paired], lower: dict[str, bool]) -> str:
    """Tasks significantly better / not / worse; better is a lower value for a lower-is-better metric."""
    sign = {t: -1 if lower[t] else 1 for t in done}
    better = sum(p.significant and sign[t] * p.diff > 0 for t, p in done.items())
    worse = sum(p.significant and sign[t] * p.diff < 0 for t, p in done.items())
    return f"{better} better / {len(done) - better - worse} same / {worse} worse"


def _task_metrics(base: RunRecord, convention: str) -> dict[str, str]:
    """Tasks whose baseline record has per-item values of the shown metric, in record order."""
    out = {}
    for task, items in base.extra.get("items", {}).items():
        m = metric_for(task, base.scores.get(task, {}), convention, base)
        if m and m in items.get("metrics", {}):
            out[task] = m
    return out


def check_baseline(col: Collection, baseline: str, default: str = "unpruned") -> None:
    """ReportError naming the methods present when no quality record is `baseline`'s. The default
    baseline may be absent (e.g. folders of pruned methods only): the paired table is then left out."""
    methods = sorted({r.method for r in col.quality})
    if baseline != default and baseline not in methods:
        raise ReportError(f"--baseline {baseline!r} matches no quality record; methods present: "
                          + (", ".join(methods) if methods else "none (latency records only)"))


def paired_table(col: Collection, baseline: str = "unpruned", convention: str = "paper") -> pd.DataFrame:
    """Rows: every other method, per model and PD setting; columns: each task's difference to
    `baseline` in points (95 % CI; McNemar p for accuracies; * = p < 0.05, else CI excludes 0), the average's, and
    the better / same / worse count over tasks. Empty when no record pairs with a baseline."""
    from reports.tables import MODE_TITLE, task_title

    groups, all_tasks = [], []
    left: dict[str, list[str]] = {"partial": [], "no_base": [], "no_items": [], "unpaired": []}  # `_left_out_text`
    keys = sorted({(col.model(r), r.mode) for r in col.quality})
    for model, mode in keys:
        rs = [r for r in col.quality if (col.model(r), r.mode) == (model, mode)]
        rows = []
        title = " · ".join(x for x in ((model if len({k[0] for k in keys}) > 1 else ""), MODE_TITLE.get(mode, mode)) if x)
        where = f" ({title})" if len(keys) > 1 else ""  # a row left out is named with its group: pdtrim of each mode
        for r in sorted(rs, key=lambda r: natural_key(col.label(r))):
            base = reference(rs, r, baseline, col)  # the baseline of r's own configuration (and folder, when it has one)
            if base is None:
                left["unpaired"] += [col.label(r) + where] if r.method != baseline else []
                continue
            if base is r:
                continue
            if (row := _paired_row(col, base, r, convention, where, left)) is not None:
                rows.append(row)
                all_tasks += [t for t in row[1] if t not in all_tasks]  # columns: the tasks some row pairs on
        if rows:
            groups.append((title, rows))
    if not groups:
        return make_table("paired", "", ["Method"], [])
    order = {t: i for i, t in enumerate(STANDARD_TASKS)}  # the quality table's column order
    all_tasks.sort(key=lambda t: (order.get(t, len(order)), t))
    cols = ["Method", *[task_title(t, col.quality) for t in all_tasks], "Avg", "Verdict"]
    any_lower = any(x for _, rows in groups for *_, lower, _ in rows for x in lower.values())
    # Avg over the quality table's Avg tasks (accuracies, not long-context tasks), and like it only for a row that has
    # every accuracy column: rows averaged over other task sets would not compare
    columns = {t for _, rows in groups for *_, accuracy in rows for t in accuracy}
    body = [(title, [[cell(col.label(r)), *[_text(done[t], lower[t]) if t in done else cell("—") for t in all_tasks],
                      _text(compare_average(list(accuracy.values()))) if accuracy and set(accuracy) == columns
                      else cell("—"),
                      cell(_verdict(done, lower))] for r, done, lower, accuracy in rows]) for title, rows in groups]
    # every cell that can carry a '*' is one test at ALPHA: the tasks' and the Avg's
    tests = sum(len(done) + bool(accuracy and set(accuracy) == columns) for _, rows in groups for _r, done, _lower, accuracy in rows)
    body = _with_bh(body)
    caption = _paired_caption(baseline, convention, tests, body, any_lower) + _left_out_text(baseline, left)
    return _one_column(make_table("paired", caption, cols, body, align="l" + "r" * (len(cols) - 2) + "l"))


def _paired_row(col: Collection, base, r, convention: str, where: str, left: dict[str, list[str]]) -> tuple | None:
    """(r, {task: its comparison with `base`}, {task: lower is better}, {accuracy task: its aligned pair}) for one row of
    `paired_table`, or None when no task pairs; what is left out goes to `left` (`where`: the row's group, named)."""
    tasks = _task_metrics(base, convention)
    left["no_base"] += [f"{col.label(r)} {t}" for t in r.extra.get("items") or {} if t not in base.scores]
    pairs = {t: aligned(base, r, t, m) for t, m in tasks.items()}
    done = {t: compare(*p) for t, p in pairs.items() if p is not None}
    if not done:  # no per-item results on one side (a record from before they were kept): no row, said so
        left["no_items"].append(col.label(r) + where)
        return None
    lower = {t: lower_is_better(base, t, m) for t, m in tasks.items()}  # pd_ppl's ppl, a plug-in's own
    accuracy = {t: pairs[t] for t in done if not is_long_task(base, t) and not lower[t]}
    left["partial"] += [f"{col.label(r)} {t} {p.n} of {n}" for t, p in done.items()
                        if p.n < (n := min(len(x["ids"]) for x in (base.extra["items"][t], r.extra["items"][t])))]
    return r, done, lower, accuracy


def _one_column(t: pd.DataFrame) -> pd.DataFrame:
    """`t` laid out to fit one text column in LaTeX (`reports.formats.to_latex`): each cell's mean, CI and p-value (a
    verdict's three counts) on lines of their own, the tabular scaled down to the column where it is still wider."""
    t.attrs.update(latex_lines=r" (?=\[)| (?=p=)| / ", latex_fit=True)
    return t
