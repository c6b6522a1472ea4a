"""Regression check: compare a rerun of the CI spec with reference records (torch-free).

Rules (each failure is one readable line):
- every reference record has a rerun with the same kind, method and mode;
- a plan's layer sets and KV policy are identical;
- KV bytes are identical, to the byte (per task, per long-context setting, per latency workload);
- a score moves by at most max(3 × stderr, 0.5 points) (accuracies, in points of %); for
  lower-is-better metrics (perplexities) by at most max(3 × stderr, 0.5 % of the reference);
- latency (TTFT/TPOT p50) is compared only between records from the same hardware, and fails when
  the rerun is slower than `(1 + tolerance) ×` the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.store.records import LOWER_IS_BETTER, RecordError, RunRecord, is_record_file, load

LATENCY_METRICS = ("ttft_ms_p50", "tpot_ms_p50")


@dataclass
class CheckResult:
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compared: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures and self.compared > 0


def hardware_key(r: RunRecord) -> tuple:
    env = r.environment
    return (env.get("device"), env.get("gpu_name"), env.get("cpu_model") or env.get("cpu"), env.get("cpu_threads"))


def _records(root: Path, res: CheckResult) -> dict[str, RunRecord]:
    """Records under `root` keyed by kind/method/mode (layout-independent). An unreadable record is skipped
    and counts as a failure naming it: a check must not pass without comparing every record."""
    out = {}
    for p in sorted(Path(root).rglob("*__*.json")):
        if not is_record_file(p):  # failed-cell notes, resume files, temp files
            continue
        try:
            r = load(p)
        except RecordError as e:
            res.failures.append(f"{e}; skipped (not compared)")
            continue
        out[f"{r.config.get('kind', 'quality')}/{r.method}/{r.mode}"] = r
    return out


def _layers(xs) -> str:
    return " ".join(map(str, xs)) or "none"


def compare_plans(where: str, ref: dict, cur: dict, res: CheckResult) -> None:
    for key, name in (("prefill_layers", "removed (prefill)"), ("decode_layers", "removed (decode)")):
        if list(ref.get(key, [])) != list(cur.get(key, [])):
            rk = "removed_" + key.split("_")[0]
            res.failures.append(f"{where}: plan changed, {name} {_layers(ref.get(rk, []))} -> {_layers(cur.get(rk, []))}")
    if ref.get("kv_policy") != cur.get("kv_policy"):
        res.failures.append(f"{where}: KV policy changed, {ref.get('kv_policy')} -> {cur.get('kv_policy')}")


def _kv_items(r: RunRecord) -> dict[str, dict]:
    items = {f"kv[{t}]": v for t, v in r.kv.items()}
    for task, by in r.extra.get("kv_by_setting", {}).items():
        items.update({f"kv[{task} {s}]": v for s, v in by.items()})
    return items


def compare_kv(where: str, ref: RunRecord, cur: RunRecord, res: CheckResult) -> None:
    a, b = _kv_items(ref), _kv_items(cur)
    for k, v in a.items():
        if k not in b:
            res.failures.append(f"{where}: {k} missing in the rerun")
            continue
        for f in ("kv_bytes", "kv_bytes_paged", "handoffs"):
            if v.get(f) != b[k].get(f):
                d = (b[k].get(f) or 0) - (v.get(f) or 0)
                res.failures.append(f"{where}: {k}.{f} {v.get(f)} -> {b[k].get(f)} ({d:+,d}); KV bytes must match exactly")


def score_tolerance(metric: str, ref_value: float, stderr: float | None) -> tuple[float, str]:
    """Allowed |change| in the metric's own units, and how it was derived (for the message)."""
    se = stderr or 0.0
    if metric in LOWER_IS_BETTER:
        floor = 0.005 * abs(ref_value)
        return max(3 * se, floor), f"max(3 × stderr {se:.3g}, 0.5 % = {floor:.3g})"
    return max(3 * se, 0.005), f"max(3 × stderr {100 * se:.2f}, 0.5) points"


def compare_scores(where: str, ref: RunRecord, cur: RunRecord, res: CheckResult) -> None:
    for task, metrics in ref.scores.items():
        for m, v in metrics.items():
            if v.get("value") is None:
                continue
            now = cur.scores.get(task, {}).get(m, {}).get("value")
            if now is None:
                res.failures.append(f"{where}: {task} {m} missing in the rerun")
                continue
            tol, how = score_tolerance(m, v["value"], v.get("stderr"))
            diff = now - v["value"]
            if abs(diff) > tol + 1e-12:
                if m in LOWER_IS_BETTER:
                    res.failures.append(f"{where}: {task} {m} {v['value']:.4g} -> {now:.4g} ({diff:+.4g}; allowed ±{tol:.3g} = {how})")
                else:
                    res.failures.append(f"{where}: {task} {m} {100 * v['value']:.1f} -> {100 * now:.1f} "
                                        f"({100 * diff:+.1f} points; allowed ±{100 * tol:.1f} = {how})")


def compare_latency(where: str, ref: RunRecord, cur: RunRecord, res: CheckResult, tolerance: float) -> None:
    if hardware_key(ref) != hardware_key(cur):
        res.notes.append(f"{where}: latency not compared (reference hardware {hardware_key(ref)}, rerun {hardware_key(cur)})")
        return
    for label, metrics in ref.scores.items():
        for m in LATENCY_METRICS:
            a = metrics.get(m, {}).get("value")
            b = cur.scores.get(label, {}).get(m, {}).get("value")
            if a is None:
                continue
            if b is None:
                res.failures.append(f"{where}: {label} {m} missing in the rerun")
            elif b > (1 + tolerance) * a:
                res.failures.append(f"{where}: {label} {m} {a:.2f} -> {b:.2f} ms ({b / a:.2f}× the reference; "
                                    f"allowed up to {1 + tolerance:.2f}× on the same hardware)")
            elif b < a / (1 + tolerance):
                res.notes.append(f"{where}: {label} {m} {a:.2f} -> {b:.2f} ms (faster; refresh the references if intended)")


def check(reference: Path, current: Path, latency_tolerance: float = 0.5) -> CheckResult:
    res = CheckResult()
    ref, cur = _records(reference, res), _records(current, res)
    if not ref:
        res.failures.append(f"{reference}: no reference records")
    for key, r in ref.items():
        where = key.split("/", 1)[1] + (" (latency)" if key.startswith("latency/") else "")
        c = cur.get(key)
        if c is None:
            res.failures.append(f"{where}: no record in the rerun ({current})")
            continue
        res.compared += 1
        if r.config.get("model") != c.config.get("model"):
            res.failures.append(f"{where}: model {r.config.get('model')} -> {c.config.get('model')}")
        compare_plans(where, r.plan, c.plan, res)
        compare_kv(where, r, c, res)
        if key.startswith("latency/"):
            compare_latency(where, r, c, res, latency_tolerance)
        else:
            compare_scores(where, r, c, res)
    for key in sorted(set(cur) - set(ref)):
        res.notes.append(f"{key}: in the rerun only (not in the references)")
    return res
