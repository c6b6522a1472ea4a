"""The Markdown tables of `benchmarks/gpu_check.py`, from its JSON-shaped results (no torch)."""

from __future__ import annotations


def _f(x, fmt: str = ".2f") -> str:
    return "—" if x is None else format(x, fmt)


def _verdict(ok) -> str:
    return "—" if ok is None else ("pass" if ok else "**FAIL**")


def _paths(paths: dict | None) -> str:
    return "—" if not paths else ", ".join(f"{p} {'yes' if ok else '**no**'}" for p, ok in paths.items())


def _agreement(rows: list[dict]) -> list[str]:
    lines = ["## (a) PD engine agreement (fp32)", "",
             "| shape | plan | candidate vs reference | requests | max abs Δ loglik | tolerance | KV bytes ref | KV bytes cand | KV same "
             "| tokens = eager | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['plan']} | {r['candidate']} vs {r['reference']} | {r['requests']} | {r['max_abs_diff']:.2e} | "
                     f"{r['tolerance']:g} | {r['kv_bytes_reference']} | {r['kv_bytes_candidate']} | {r['kv_identical']} ({r['kv_compared']}) | "
                     f"{_paths(r.get('decode_paths_equal'))} | {_verdict(r['pass'])} |")
    return lines


def _latency(rows: list[dict]) -> list[str]:
    lines = ["## (b) Latency per stage (p50)", "",
             "| shape | plan | B | decode | TTFT ms | TPOT ms | handoff ms | KV MiB | eager bytes | TTFT cut | removed prefill | TPOT vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cut = r.get("ttft_reduction")
        lines.append(f"| {r['shape']} | {r['plan']} | {r['batch']} | {r['decode_mode']} | {r['ttft_ms_p50']:.2f} | {_f(r['tpot_ms_p50'], '.3f')} | "
                     f"{r['handoff_ms_p50']:.2f} | {r['kv_bytes'] / 2**20:.2f} | {_f(r['kv_bytes_equal_eager'], '')} | "
                     f"{_f(None if cut is None else 100 * cut, '.1f')}% | {100 * r['removed_prefill_fraction']:.1f}% | "
                     f"{_f(r.get('tpot_vs_dense'), '.3f')} |")
    return lines


def _bound(b: dict) -> list[str]:
    lines = [f"## (c) {b['decode_mode']} TPOT vs the HBM bound", "",
             f"Copy bandwidth measured on this device (read + write): {b['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s; "
             "bound = bytes a step reads (decode layers, final norm, LM head, KV held) ÷ that bandwidth. ops = what the "
             "graph replays a step (each at least one kernel); floor = ops × one tiny op's cost here, "
             f"{'replayed from a graph' if b['decode_mode'] == 'graph' else 'run eagerly'} "
             f"({_f((b.get('small_op_s') or 0) * 1e6 or None)} µs); µs/op = (TPOT − bound) ÷ ops.", "",
             "| shape | plan | B | TPOT ms | bytes/step (MiB) | bound ms | TPOT / bound | ops/step | µs/op over bound | floor ms "
             "| TPOT / (bound + floor) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in b["rows"]:
        lines.append(f"| {r['shape']} | {r['plan']} | {r['batch']} | {r['tpot_ms_p50']:.3f} | {r['bytes_read_per_step'] / 2**20:.1f} | "
                     f"{r['bound_ms']:.3f} | {r['tpot_over_bound']:.2f} | {r.get('ops_per_step') or '—'} | "
                     f"{_f(r.get('us_per_op_over_bound'))} | {_f(r.get('floor_ms'), '.3f')} | {_f(r.get('tpot_over_expected'))} |")
    c = b.get("check")
    if c:
        lines += ["", f"Check, {c['row']}: TPOT / bound = {c['tpot_over_bound']:.2f}; TPOT / (bound + floor) = "
                  f"{_f(c.get('tpot_over_expected'))} (limit {c['limit']}): {_verdict(c['pass'])}" + (f" ({c['note']})" if c.get("note") else "")]
    return lines


def _ipc(d: dict) -> list[str]:
    return ["## (d) Handoff between two processes on one device", "",
            "| shape | plan | B | backend | KV bytes counted | KV bytes received | metadata bytes | tensors equal | handoff ms | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| {d['shape']} | {d['plan']} | {d['batch']} | {d['backend']} | {d['kv_bytes_counted']} | {d['kv_bytes_received']} | "
            f"{d['metadata_bytes_received']} | {d['tensors_equal']} | {d['handoff_ms']:.2f} | {_verdict(d['pass'])} |"]


def markdown(out: dict) -> str:
    """The table of what `out` holds so far (every section optional: it is rewritten as the run goes)."""
    dev = out.get("device", {})
    lines = ["# GPU check", "",
             f"torch {out.get('torch')}, transformers {out.get('transformers')}, device {dev.get('gpu_name') or dev.get('cpu_model') or 'cpu'}; "
             f"dtype {out.get('args', {}).get('dtype')} for (b)-(d), fp32 for (a).", ""]
    if out.get("agreement"):
        lines += _agreement(out["agreement"]) + [""]
    if out.get("latency"):
        lines += _latency(out["latency"]) + [""]
    if out.get("hbm_bound"):
        lines += _bound(out["hbm_bound"]) + [""]
    if out.get("ipc_handoff"):
        lines += _ipc(out["ipc_handoff"]) + [""]
    if out.get("errors"):
        lines += ["## Failed steps", ""] + [f"- {e['step']}: {e['error']}" for e in out["errors"]] + [""]
    if out.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {s['step']}: {s['reason']}" for s in out["skipped"]] + [""]
    if out.get("seconds") is not None:
        lines.append(f"Wall time {out['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"
