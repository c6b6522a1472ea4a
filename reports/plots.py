"""Figures from run records (matplotlib, Agg backend): PNG and SVG, labelled axes with units.

Each `plot_*` returns a Figure, or None when the records hold no data for it (e.g. no latency
records), so a report shows what it can and says what is missing.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "pd-harness"  # SVG element ids from the content, not random: same records, same file
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from harness.store.files import atomic_file  # noqa: E402
from harness.store.records import RunRecord, is_long_task  # noqa: E402
from reports.collect import Collection, folder_suffix, metric_for, natural_key  # noqa: E402
from reports.figure_labels import plain as _plain  # noqa: E402
from reports.record_values import MIB, MODE_TITLE, kv_sent, ordered_tasks, parse_workload, removed_counts, se_of_mean, stored_score  # noqa: E402

MARKERS = "osD^v<>pP*Xh"


def _legend(ax) -> None:
    """The axes' legend: inside for a few entries; beside the axes, in columns of up to 18, for more (a depth sweep's
    20-odd points covered the data and ran off the axes)."""
    n = len(ax.get_legend_handles_labels()[0])
    if n <= 8:
        ax.legend(fontsize=8)
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, ncol=-(-n // 18))


def _legend_inches(n: int) -> float:
    """The width to add to a figure for a legend of `n` entries placed beside its axes by `_legend` (none inside)."""
    return 0.0 if n <= 8 else 2.6 * -(-n // 18)


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _score_of(tasks: list[str]) -> str:
    """The score axis's name: the average over several tasks, or the one task's score ("over 1 tasks" read oddly)."""
    return f"score on {_plain(tasks[0])}" if len(tasks) == 1 else f"average score over {len(tasks)} tasks"


def avg_score(r: RunRecord, tasks: list[str], convention: str) -> tuple[float | None, float | None]:
    """(mean accuracy over `tasks`, its standard error), in %; (None, None) if the record lacks any task,
    and a None standard error if any task's is unknown."""
    vals, ses = [], []
    for t in tasks:
        v, se = stored_score(r, t, metric_for(t, r.scores.get(t, {}), convention, r))
        if v is None:
            return None, None
        vals.append(100 * v)
        ses.append(None if se is None else 100 * se)
    return (sum(vals) / len(vals), se_of_mean(ses)) if vals else (None, None)


def _accuracy(r: RunRecord, t: str) -> bool:
    return "acc" in r.scores.get(t, {}) or "acc_norm" in r.scores.get(t, {})


def figure_tasks(col: Collection) -> tuple[list[str], list[str]]:
    """(the accuracy tasks every quality record scored, which the score figures average over; the other
    accuracy tasks, left out of them). An average over a task only some records have would put points
    on different scales on one axis, so those records were dropped without a word; now the task is."""
    tasks = [t for t in ordered_tasks(col.quality, lambda r, t: not is_long_task(r, t))
             if all(_accuracy(r, t) for r in col.quality if t in r.scores)]
    # a record of long-context tasks only (a `--tasks long` run beside the accuracy run) has no point in these
    # figures: counted here, it left no task shared and both score figures were dropped as "no data"
    scoring = [r for r in col.quality if any(t in r.scores for t in tasks)]
    shared = [t for t in tasks if all(t in r.scores for r in scoring)]
    return shared, [t for t in tasks if t not in shared]


def _mc_tasks(col: Collection) -> list[str]:
    return figure_tasks(col)[0]


def legend_order(label: str) -> tuple:
    """A figure's order of its labels, the tables' order: unpruned (of any folder) first, then numbers read as numbers
    (`shortgpt@k=2` before `shortgpt@k=10`; the legends of score_vs_kv, bytes_vs_prompt and latency_bars sorted them
    as text, `k=10` before `k=2`, beside tables and a depth-curve legend that do not)."""
    return label.split(" (")[0] != "unpruned", natural_key(label)


def _methods(records: list[RunRecord], col: Collection) -> list[str]:
    return sorted({col.label(r) for r in records}, key=legend_order)


def _variant(method: str) -> tuple[str, dict[str, str]]:
    """A swept variant's method and option values: `pdtrim@k_prefill=2,k_decode=4` -> ('pdtrim',
    {'k_prefill': '2', 'k_decode': '4'}); a part without '=' belongs to the value before it."""
    base, _, rest = method.partition("@")
    opts: dict[str, str] = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if eq:
            opts[key] = value
        elif opts:
            last = next(reversed(opts))
            opts[last] += "," + part
    return base, opts


def _depth_option(group: list[RunRecord]) -> str | None:
    """The swept option along which `group` (one run's variants of one method) removes more blocks:
    the first, by name, whose value alone fixes the blocks removed; None when the depth does not vary
    or no one option sets it."""
    pts = [(_variant(r.method)[1], removed_counts(r)[1]) for r in group]
    if len({x for _, x in pts}) < 2:
        return None
    for key in sorted({k for opts, _ in pts for k in opts}):
        depth: dict[str | None, int] = {}
        if len({opts.get(key) for opts, _ in pts}) > 1 and all(depth.setdefault(opts.get(key), x) == x for opts, x in pts):
            return key
    return None


def series(col: Collection, r: RunRecord, recs: list[RunRecord] | None = None) -> str:
    """A curve's name among `recs` (default: the quality records of `r`'s mode): the record's method
    without its depth option (`shortgpt@k=2` -> `shortgpt`) but with the other swept options' values
    (`pdtrim@k_prefill=2,k_decode=4` -> `pdtrim@k_prefill=2`), and its folder when the method's
    records come from several (`shortgpt (a)`): one line per run and per fixed value of the others."""
    recs = [o for o in col.quality if o.mode == r.mode] if recs is None else recs
    base, opts = _variant(r.method)
    peers = [o for o in recs if _variant(o.method)[0] == base]
    depth = _depth_option([o for o in peers if col.folder(o) == col.folder(r)])
    fixed = ",".join(f"{k}={v}" for k, v in opts.items() if k != depth)
    name = f"{base}@{fixed}" if fixed else base
    folders = sorted({col.folder(o) for o in peers})
    return name if len(folders) < 2 else f"{name} ({folder_suffix(col.folder(r), folders)})"


def plot_score_vs_blocks(col: Collection, convention: str = "paper"):
    """Average score against blocks removed (decode stage), one line per method and run (`series`), a
    panel per mode."""
    tasks = _mc_tasks(col)
    modes = [m for m in MODE_TITLE if any(r.mode == m for r in col.quality)]
    if not tasks or not modes:
        return None
    widest = max(len({series(col, r, rs) for r in rs}) for m in modes if (rs := [r for r in col.quality if r.mode == m]))
    fig, axes = plt.subplots(1, len(modes), figsize=((5.5 + _legend_inches(widest)) * len(modes), 4), squeeze=False,
                             sharey=True)
    drawn = 0
    for ax, mode in zip(axes[0], modes):
        recs = [r for r in col.quality if r.mode == mode]
        name = {id(r): series(col, r, recs) for r in recs}
        for i, m in enumerate(sorted(set(name.values()), key=legend_order)):
            scored = ((removed_counts(r)[1], *avg_score(r, tasks, convention)) for r in recs if name[id(r)] == m)
            pts = sorted((x, y, e) for x, y, e in scored if y is not None)
            if pts:
                xs, ys, es = zip(*pts)
                # an unknown standard error draws no bar (NaN), not a zero-length one that claims no noise
                ax.errorbar(xs, ys, yerr=[float("nan") if e is None else e for e in es], marker=MARKERS[i % len(MARKERS)],
                            capsize=3, label=_plain(m))
                drawn += 1
        _style(ax, MODE_TITLE[mode], "blocks removed (decode stage)", f"{_score_of(tasks)} (%, ± 1 se)")
        ax.set_ylim(0, 100)  # the whole scale: a truncated axis makes noise look like an effect
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks are counted
        if ax.get_legend_handles_labels()[0]:
            _legend(ax)
    if not drawn:  # no blank axes in the report: the figure is left out, and the notes say so
        plt.close(fig)
        return None
    fig.tight_layout()
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (less or equal KV, higher or equal score, one of
    them strictly), by increasing KV."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_score_vs_kv(col: Collection, convention: str = "paper"):
    """Average score against KV bytes sent per request (disaggregated records)."""
    tasks = _mc_tasks(col)
    # per request: a record needs the handoff count of each task (older kv entries may lack it; zero items have none)
    recs = [r for r in col.quality if r.mode == "disaggregated" and kv_sent(r, tasks) and all(r.kv[t].get("handoffs") for t in tasks)]
    if not tasks or not recs:
        return None
    fig, ax = plt.subplots(figsize=(6 + _legend_inches(len(recs) + 1), 4))
    pts = []
    for i, r in enumerate(sorted(recs, key=lambda r: (r.method != "unpruned", natural_key(col.label(r))))):
        handoffs = sum(r.kv[t]["handoffs"] for t in tasks)
        x, y = kv_sent(r, tasks) / handoffs / MIB, avg_score(r, tasks, convention)[0]
        if y is not None:
            ax.scatter([x], [y], marker=MARKERS[i % len(MARKERS)], s=60, label=_plain(col.label(r)))
            pts.append((x, y))
    if not pts:
        plt.close(fig)
        return None
    front = pareto_front(pts)
    if len(front) > 1:
        ax.plot(*zip(*front), color="0.4", linestyle="--", linewidth=1, zorder=0, label="Pareto frontier")
    ax.set_ylim(0, 100)
    _style(ax, "Score versus KV sent (PD-disaggregated)", "KV bytes sent per request: all handoffs of these tasks (MiB)",
           f"{_score_of(tasks)} (%)")
    _legend(ax)
    fig.tight_layout()
    return fig


def plot_latency_bars(col: Collection):
    """TTFT and TPOT (p50) per method, grouped by workload."""
    labels = sorted({lab for r in col.latency for lab in r.latency if parse_workload(lab)}, key=parse_workload)
    if not labels:
        return None
    methods = _methods(col.latency, col)
    fig, axes = plt.subplots(1, 2, figsize=(11 + 2 * _legend_inches(len(methods)), 4))
    width = 0.8 / max(1, len(methods))
    for ax, metric, name in ((axes[0], "ttft_ms_p50", "TTFT p50 (ms)"), (axes[1], "tpot_ms_p50", "TPOT p50 (ms)")):
        for i, m in enumerate(methods):
            ys = []
            for lab in labels:
                r = next((r for r in col.latency if col.label(r) == m and lab in r.latency), None)
                v = r.figure(lab, metric) if r else None
                ys.append(float("nan") if v is None else v)  # not measured: no bar, not a bar of 0 ms
            ax.bar([j + i * width for j in range(len(labels))], ys, width, label=_plain(m))
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels([f"T{w[0]} n{w[1]} b{w[2]}" + ("" if w[3] == "eager" else f" {w[3]}")
                            for w in map(parse_workload, labels)], fontsize=8)
        _style(ax, name.split(" p50")[0] + " per method", "workload (prompt tokens T, decode tokens n, batch b)", name)
        _legend(ax)
    fig.tight_layout()
    return fig


def plot_sensitivity(col: Collection):
    """Per-layer stage sensitivity (PDTrim: objective with one block removed from prefill or decode)
    and block scores (1 - mean cos(h_in, h_out), i.e. ShortGPT's Block Influence)."""
    sens = next((r for r in col.quality if r.plan.get("info", {}).get("stage_sensitivity")), None)
    scored = next((r for r in col.quality if r.plan.get("info", {}).get("block_influence")), None) or next(
        (r for r in col.quality if r.plan.get("info", {}).get("block_cosine")), None)
    if sens is None and scored is None:
        return None
    panels = [x for x in (sens, scored) if x is not None]  # one panel each: no blank axes beside a lone one
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    axes = list(axes[0])
    if sens is not None:
        ax = axes.pop(0)
        s = {k: [float("nan") if v is None else v for v in s_] for k, s_ in sens.plan["info"]["stage_sensitivity"].items()
             if k in ("prefill", "decode")}  # null: a block the search never considered (not measured)
        n = len(s["prefill"])
        w = 0.4
        ax.bar([i - w / 2 for i in range(n)], s["prefill"], w, label="removed from prefill (and decode)")
        ax.bar([i + w / 2 for i in range(n)], s["decode"], w, label="removed from decode only")
        ax.set_yscale("log")
        unmeasured = any(v != v for xs in s.values() for v in xs)  # NaN: a block the search never considered
        _style(ax, f"Stage sensitivity per block ({_plain(col.label(sens))})",
               "block index" + (" (no bar: not measured)" if unmeasured else ""), "KL to the dense model (nats, log scale)")
        ax.set_xlim(-0.5, n - 0.5)  # every block, as the block-score panel: unmeasured end blocks narrowed the axis to 2..27
        ax.legend(fontsize=8)
    if scored is not None:
        ax = axes.pop(0)
        info = scored.plan["info"]
        bi = info.get("block_influence") or [1 - c for c in info["block_cosine"]]
        removed = set(scored.plan.get("removed_decode", []))
        ax.bar(range(len(bi)), bi, color=["tab:red" if i in removed else "tab:blue" for i in range(len(bi))])
        ax.set_yscale("log")
        _style(ax, f"Block score 1 − cos(h_in, h_out) ({_plain(col.label(scored))}; red: removed in decode)",
               "block index", "1 − mean cosine (log scale)")
    for ax in fig.axes:  # block indices are integers: no tick at -0.5 or 2.5
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_bytes_vs_prompt(col: Collection):
    """KV bytes sent per request against prompt length (long-context tasks and latency workloads)."""
    series: dict[str, dict[int, float]] = {}
    for r in col.quality:
        if r.mode != "disaggregated":
            continue
        for by in r.extra.get("kv_by_setting", {}).values():
            for setting, kv in by.items():
                if kv.get("handoffs") and setting[1:].isdigit():  # a setting of no prompt length (a plug-in's) has no x
                    series.setdefault(col.label(r), {})[int(setting[1:])] = kv["kv_bytes"] / kv["handoffs"]
    for r in col.latency:
        for lab, kv in r.kv.items():
            w = parse_workload(lab)
            if w and kv.get("handoffs"):
                series.setdefault(col.label(r), {})[w[0]] = kv["kv_bytes"] / kv["handoffs"]
    if not series:
        return None
    # a baselines run's 15 methods: the legend inside covered the lines (`_legend` puts a long one beside the axes)
    fig, ax = plt.subplots(figsize=(6 + _legend_inches(len(series)), 4))
    for i, (m, pts) in enumerate(sorted(series.items(), key=lambda kv: legend_order(kv[0]))):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] / MIB for x in xs], marker=MARKERS[i % len(MARKERS)], label=_plain(m))
    ax.set_xscale("log", base=2)
    _style(ax, "KV sent per request versus prompt length", "prompt tokens (log scale)", "KV bytes sent per request (MiB)")
    _legend(ax)
    fig.tight_layout()
    return fig


PLOTS = {
    "score_vs_blocks": ("Average score versus blocks removed", plot_score_vs_blocks),
    "score_vs_kv": ("Average score versus KV bytes sent per request", plot_score_vs_kv),
    "latency_bars": ("TTFT and TPOT per method", plot_latency_bars),
    "stage_sensitivity": ("Per-layer stage sensitivity and block scores", plot_sensitivity),
    "bytes_vs_prompt": ("KV bytes sent versus prompt length", plot_bytes_vs_prompt),
}


def save_plots(col: Collection, out: Path, convention: str = "paper",
               notes: list[str] | None = None) -> dict[str, dict[str, Path]]:
    """Write every plot that has data as `<name>.png` and `<name>.svg`; returns {name: {fmt: path}}. Characters of a
    label that the figures' font lacks (drawn as empty boxes) are named in a line appended to `notes`."""
    out.mkdir(parents=True, exist_ok=True)
    written, missing = {}, {}
    for name, (_, fn) in PLOTS.items():
        with _glyphs_missing(missing):  # a layout pass draws the labels too
            fig = fn(col, convention) if name.startswith("score_") else fn(col)
        if fig is None:
            continue
        paths = {}
        for fmt in ("png", "svg"):
            paths[fmt] = out / f"{name}.{fmt}"
            with atomic_file(paths[fmt]) as f, _glyphs_missing(missing):  # a killed report: the old figure or the new
                fig.savefig(f, format=fmt, dpi=130, bbox_inches="tight",  # a legend beside the axes stays in
                            metadata={"Date": None} if fmt == "svg" else None)
        plt.close(fig)
        written[name] = paths
    if missing and notes is not None:
        chars = "".join(sorted(missing))
        notes.append(f"figures: {len(missing)} character(s) of the labels ({chars[:20]}{' …' if len(chars) > 20 else ''}) "
                     f"are not in the figures' font ({', '.join(sorted(set(missing.values())))}) and show as empty boxes; "
                     "the tables show the names as typed (set matplotlib's font.family to a font that has them)")
    return written


@contextlib.contextmanager
def _glyphs_missing(found: dict[str, str]) -> Iterator[None]:
    """Add {character: font} to `found` for each glyph matplotlib warns the body's drawing lacks ("Glyph 21098 (...)
    missing from font(s) DejaVu Sans.": a CJK method name was drawn as boxes, in silence); its other warnings pass on
    as they were."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        m = re.match(r"Glyph (\d+) \(.*\) missing from font\(s\) (.*)\.$", str(w.message))
        if m:
            found[chr(int(m.group(1)))] = m.group(2)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
