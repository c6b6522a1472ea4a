"""After the GPU run: the issue's pass/fail lines and a side-by-side with the reference figures, from `gpu_check.py`'s JSON.

Two parts, one Markdown file:

1. **Verdicts** (what issue 16 asks of the run), read from the JSON as measured:
   - (c) graph TPOT ≤ 1.2 × (HBM bound + small-op floor) on the first shape, dense, batch 1, and beside it the
     issue's own words, graph TPOT ≤ 1.2 × HBM bound (no floor);
   - every pruned eager row's TTFT reduction within 5 points of the fraction of prefill layers it removed;
   - (a) GPU-vs-CPU agreement (max |Δ log-likelihood| ≤ tolerance, identical KV bytes, decode paths = eager);
   - (b) every static/graph row sent the eager row's bytes; (d) bytes received = bytes counted.
2. **Against `../shared/GPU_REFERENCE.md`** (one H100, HF eager forward, dynamic cache, bf16, batch 1): per
   reference shape the run also measured, the layer counts and prompt KV MiB (must be equal: arithmetic, not
   timing), and TTFT, TPOT, TTFT cut, copy bandwidth and the decode bound next to the reference's, as ratios.
   Our eager path is the PD engine's, not HF `generate`, so times are information: a ratio outside
   [0.5, 2] is marked for a look, never failed.

    python benchmarks/gpu_compare.py results/gpu/gpu_check.json --md results/gpu/compare.md

Exit status 0 when every verdict holds, 1 when one fails, 2 for input that is not a gpu_check JSON.
Needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_report import _f, _paths, _verdict  # noqa: E402  (gpu_check.py's table: the same cells)

ROOT = Path(__file__).resolve().parent.parent
ARROW = re.compile(r"([\d.]+)\s*→\s*([\d.]+)")


def norm(shape: str) -> str:
    """'Llama-3-8B' and 'llama3-8b' both -> 'llama38b'."""
    return re.sub(r"[^a-z0-9]", "", shape.lower())


def parse_reference(text: str) -> dict:
    """The reference's table rows (per normalised shape: dense → pruned pairs) and the figures in its prose."""
    rows, cols = {}, None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if not cells or set(line) <= set("|-: "):
            continue
        if cols is None:
            cols = [c.lower() for c in cells]
            continue
        row = {"name": cells[0]}
        for key, word in (("layers", "layers"), ("ttft_ms", "ttft"), ("tpot_ms", "tpot"), ("kv_mib", "kv")):
            i = next((j for j, c in enumerate(cols) if word in c), None)
            m = ARROW.search(cells[i]) if i is not None and i < len(cells) else None
            row[key] = (float(m[1]), float(m[2])) if m else None
            row[f"{key}_digits"] = (_decimals(m[1]), _decimals(m[2])) if m else None
        rows[norm(cells[0])] = row
    find = lambda pattern: re.search(pattern, text)  # noqa: E731
    prompt, batch = find(r"prompt\s+of\s+(\d+)\s+tokens,\s+(\d+)\s+decode\s+steps"), find(r"batch\s+(\d+)")
    bw = find(r"device-to-device\s+≈\s*([\d.]+)\s+TB/s")
    bound = find(r"bound\s+of\s+one\s+decode\s+step\s+of\s+(\S+)\s+\(([\d.]+)\s+GB[^)]*\)\s+is\s+≈\s*([\d.]+)\s+ms")
    return {"rows": rows, "prompt_tokens": int(prompt[1]) if prompt else None, "decode_tokens": int(prompt[2]) if prompt else None,
            "batch": int(batch[1]) if batch else None, "bf16": "bf16" in text, "copy_bandwidth_bytes_per_s": float(bw[1]) * 1e12 if bw else None,
            "bound": {"shape": norm(bound[1]), "weights_gb": float(bound[2]), "ms": float(bound[3])} if bound else None}


def _decimals(number: str) -> int:
    return len(number.split(".")[1]) if "." in number else 0


def verdicts(res: dict) -> list[dict]:
    """Issue 16's lines, each {what, figure, pass}; pass None where the run holds no figure for it."""
    out = []
    check = (res.get("hbm_bound") or {}).get("check")
    out.append({"what": f"(c) graph TPOT ≤ 1.2 × (bound + floor), {check['row']}" if check else "(c) graph TPOT ≤ 1.2 × (bound + floor)",
                "figure": (f"TPOT / (bound + floor) = {_f(check.get('tpot_over_expected'))}, TPOT / bound = {_f(check.get('tpot_over_bound'))}"
                           + (f" ({check['note']})" if check.get("note") else "")) if check else "not measured",
                "pass": check.get("pass") if check else None})
    # the line as issue 16's "Done means" words it (no floor): judged on a graph row only, beside the one above
    graph = check is not None and (res.get("hbm_bound") or {}).get("decode_mode") == "graph" and check.get("tpot_over_bound") is not None
    out.append({"what": "(c) graph TPOT ≤ 1.2 × bound, as issue 16 words it" + (f", {check['row']}" if check else ""),
                "figure": f"TPOT / bound = {_f(check.get('tpot_over_bound'))}" if check else "not measured",
                "pass": check["tpot_over_bound"] <= check.get("limit", 1.2) if graph else None})
    on_gpu = str(res.get("args", {}).get("device", "")).startswith("cuda")  # a CPU stand-in's times are not judged
    for r in res.get("latency", []):
        if r["plan"] != "dense" and r["decode_mode"] == "eager" and r.get("ttft_reduction") is not None:
            gap = abs(r["ttft_reduction"] - r["removed_prefill_fraction"])
            out.append({"what": f"(b) TTFT cut within 5 points of the removed prefill fraction, {r['shape']} {r['plan']} B={r['batch']}",
                        "figure": f"cut {100 * r['ttft_reduction']:.1f}% vs removed {100 * r['removed_prefill_fraction']:.1f}% "
                                  f"({100 * gap:.1f} points)" + ("" if on_gpu else "; no verdict off a GPU"),
                        "pass": gap <= 0.05 if on_gpu else None})
    for r in res.get("agreement", []):
        out.append({"what": f"(a) agreement {r['shape']} {r['plan']} ({r['candidate']} vs {r['reference']})",
                    "figure": f"max |Δ loglik| {r['max_abs_diff']:.2e} (≤ {r['tolerance']:g}), KV {r['kv_bytes_candidate']} vs "
                              f"{r['kv_bytes_reference']} B, decode paths = eager: {_paths(r.get('decode_paths_equal'))}", "pass": r["pass"]})
    moved = [r for r in res.get("latency", []) if r["decode_mode"] != "eager"]
    if moved:
        bad = [f"{r['shape']} {r['plan']} B={r['batch']} {r['decode_mode']}" for r in moved if r.get("kv_bytes_equal_eager") is not True]
        out.append({"what": "(b) static and graph rows send the eager rows' bytes", "figure": f"{len(moved) - len(bad)} of {len(moved)} rows"
                    + (f"; not: {', '.join(bad)}" if bad else ""), "pass": not bad})
    d = res.get("ipc_handoff")
    out.append({"what": "(d) handoff between two processes: bytes received = bytes counted",
                "figure": f"{d['kv_bytes_received']} received, {d['kv_bytes_counted']} counted ({d['backend']})" if d else "not measured",
                "pass": d["pass"] if d else None})
    for e in res.get("errors", []):
        out.append({"what": f"step ran: {e['step']}", "figure": e["error"][:200], "pass": False})
    return out


def _cell(x) -> str:
    return str(x).replace("|", "\\|")  # a literal | would end the Markdown cell


def _row(res: dict, shape: str, plan: str, mode: str, batch: int) -> dict | None:
    return next((r for r in res.get("latency", []) if norm(r["shape"]) == shape and r["plan"] == plan and r["decode_mode"] == mode
                 and r["batch"] == batch), None)


def against_reference(res: dict, ref: dict) -> list[dict]:
    """Rows {shape, quantity, reference, measured, ratio, pass}: pass is True/False for the arithmetic (layers, KV
    MiB), None for times (information; `look` marks a ratio outside [0.5, 2])."""
    out = []
    for key, r in ref["rows"].items():
        out += _shape_rows(res, ref, key, r)
    return out + _device_rows(res, ref)


def _note(shape: str, what: str) -> dict:
    return {"shape": shape, "quantity": what, "reference": "", "measured": "", "ratio": None, "pass": None}


def _shape_rows(res: dict, ref: dict, key: str, r: dict) -> list[dict]:
    """One reference shape: its dense and pruned rows (ShortGPT-like: a deep block, the last layer kept) at its batch."""
    args, batch, name = res.get("args", {}), ref["batch"] or 1, r["name"]
    dense, pruned = _row(res, key, "dense", "eager", batch), _row(res, key, "shortgpt-like", "eager", batch)
    if dense is None:
        return [_note(name, "(not in this run's latency shapes)")]
    layers = lambda row: len(row["prefill_layers"]) if row else None  # noqa: E731
    out = [_compare(name, f"layers ({w})", r["layers"][i], layers(row), exact=True, digits=0)
           for i, (w, row) in enumerate((("dense", dense), ("pruned", pruned)))] if r["layers"] else []
    same_load = (args.get("prompt_tokens"), args.get("decode_tokens")) == (ref["prompt_tokens"], ref["decode_tokens"])
    if not (same_load and str(args.get("dtype")).lower() in ("bfloat16", "bf16") and ref["bf16"]):
        return [*out, _note(name, "times and KV (workload or dtype differs from the reference's)")]
    if r["kv_mib"]:
        out += [_compare(name, f"prompt KV MiB ({w})", r["kv_mib"][i], row["kv_bytes"] / 2**20 if row else None, exact=True,
                         digits=r["kv_mib_digits"][i]) for i, (w, row) in enumerate((("dense", dense), ("pruned", pruned)))]
    for q, col in (("TTFT ms", "ttft_ms"), ("TPOT ms eager", "tpot_ms")):
        out += [_compare(name, f"{q} ({w})", r[col][i], row[f"{col}_p50"]) for i, (w, row) in enumerate((("dense", dense), ("pruned", pruned)))
                if r[col] and row and row[f"{col}_p50"] is not None]
    if r["ttft_ms"] and pruned:
        cut = 100 * (1 - pruned["ttft_ms_p50"] / dense["ttft_ms_p50"])
        out.append(_compare(name, "TTFT cut %", 100 * (1 - r["ttft_ms"][1] / r["ttft_ms"][0]), cut))
    graph = _row(res, key, "dense", "graph", batch)
    if r["tpot_ms"] and graph:
        out.append(_compare(name, "TPOT ms graph (dense) vs HF eager", r["tpot_ms"][0], graph["tpot_ms_p50"]))
    return out


def _device_rows(res: dict, ref: dict) -> list[dict]:
    out, bw = [], (res.get("rates") or {}).get("copy_bandwidth_bytes_per_s")
    if ref["copy_bandwidth_bytes_per_s"] and bw:
        out.append(_compare("(device)", "copy bandwidth GB/s (read + write)", ref["copy_bandwidth_bytes_per_s"] / 1e9, bw / 1e9))
    b = ref["bound"]
    rows = (res.get("hbm_bound") or {}).get("rows", [])
    mine = next((x for x in rows if b and norm(x["shape"]) == b["shape"] and x["plan"] == "dense" and x["batch"] == 1), None)
    if b and mine:
        out.append(_compare(mine["shape"], f"decode bound ms (ref: {b['weights_gb']} GB of weights; ours: "
                                           f"{mine['bytes_read_per_step'] / 1e9:.2f} GB read a step)", b["ms"], mine["bound_ms"]))
    return out


def _compare(shape: str, quantity: str, reference: float, measured: float | None, exact: bool = False, digits: int | None = None) -> dict:
    if measured is None:
        return {"shape": shape, "quantity": quantity, "reference": reference, "measured": None, "ratio": None, "pass": False if exact else None}
    ratio = measured / reference if reference else None
    ok = round(measured, digits) == round(reference, digits) if exact else None
    return {"shape": shape, "quantity": quantity, "reference": reference, "measured": measured, "ratio": ratio, "pass": ok,
            "look": not exact and ratio is not None and not 0.5 <= ratio <= 2}


def markdown(res: dict, checks: list[dict], compared: list[dict] | None, ref_path: str) -> str:
    dev = res.get("device", {})
    lines = ["# GPU check: verdicts and the reference", "",
             f"torch {res.get('torch')}, transformers {res.get('transformers')}, device {dev.get('gpu_name') or dev.get('cpu_model') or 'cpu'}, "
             f"dtype {res.get('args', {}).get('dtype')}.", "", "## Verdicts (issue 16)", "", "| check | figure | verdict |", "|---|---|---|"]
    lines += [f"| {_cell(c['what'])} | {_cell(c['figure'])} | {_verdict(c['pass'])} |" for c in checks]
    if compared is not None:
        lines += ["", f"## Against `{ref_path}`", "",
                  "Layers and KV MiB are arithmetic and must be equal; times are the PD engine's against HF eager with a dynamic "
                  "cache, so their ratios are information (*look*: outside [0.5, 2]).", "",
                  "| shape | quantity | reference | measured | measured ÷ reference | verdict |", "|---|---|---|---|---|---|"]
        for c in compared:
            verdict = _verdict(c["pass"]) if c["pass"] is not None else ("*look*" if c.get("look") else "")
            lines.append(f"| {_cell(c['shape'])} | {_cell(c['quantity'])} | {_num(c['reference'])} | {_num(c['measured'])} | "
                         f"{_f(c['ratio'])} | {verdict} |")
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return x if isinstance(x, str) else _f(x, ".4g")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="gpu_check.py's JSON")
    p.add_argument("--reference", default=str(ROOT.parent / "shared" / "GPU_REFERENCE.md"),
                   help="the reference figures (default ../shared/GPU_REFERENCE.md); the comparison is left out if it is missing")
    p.add_argument("--md", default=None, help="write the Markdown here too (it is always printed)")
    args = p.parse_args(argv)
    try:
        res = json.loads(Path(args.json).read_text())
        if not isinstance(res, dict) or "latency" not in res:
            raise ValueError("no 'latency' list: not a gpu_check.py JSON")
    except (OSError, ValueError) as e:
        print(f"gpu_compare: cannot read {args.json}: {e}", file=sys.stderr)
        return 2
    ref_path = Path(args.reference)
    compared = against_reference(res, parse_reference(ref_path.read_text())) if ref_path.is_file() else None
    checks = verdicts(res)
    text = markdown(res, checks, compared, args.reference)
    if compared is None:
        text += f"\n(no reference at {args.reference}: comparison left out)\n"
    print(text, end="")
    if args.md:
        Path(args.md).write_text(text)
    failed = [c for c in checks + (compared or []) if c["pass"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
