"""One self-contained HTML report: tables, figures embedded as data URIs, provenance per record.

No external assets, scripts or fonts: the file opens from disk in any browser with no server.
"""

from __future__ import annotations

import base64
import datetime as dt
from html import escape
from pathlib import Path

import pandas as pd

from reports.collect import Collection, is_latency
from reports.formats import to_html
from reports.tables import hardware

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.85rem}
caption{caption-side:top;text-align:left;font-size:.85rem;color:#444;padding-bottom:.4rem;max-width:1100px}
th,td{border-bottom:1px solid #e4e4e4;padding:.25rem .6rem;text-align:right;white-space:nowrap}
th:first-child,td:first-child,td:nth-child(2){text-align:left}
thead th{border-bottom:2px solid #888;background:#fafafa}tr.group th{text-align:left;font-style:italic;background:#f3f6fa}
table.provenance td{text-align:left;white-space:normal;font-family:ui-monospace,monospace;font-size:.78rem}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85rem;color:#444}
.missing{color:#a33}.scroll{overflow-x:auto}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


def provenance_rows(col: Collection) -> list[list[str]]:
    rows = []
    for r in sorted(col.all, key=lambda r: (str(col.source(r)))):
        env, pk = r.environment, r.environment.get("packages", {})
        git = env.get("git") or {}
        commit = (git.get("commit") or "?")[:12] + (" (dirty)" if git.get("dirty") else "")
        rows.append([
            str(col.source(r)), "latency" if is_latency(r) else "quality", r.method, r.mode, col.model(r),
            str(r.config.get("seed")), f"torch {pk.get('torch')}, transformers {pk.get('transformers')}, lm-eval {pk.get('lm_eval')}",
            hardware(r), commit, r.created, r.run_key,
        ])
    return rows


def render_html(col: Collection, tables: list[pd.DataFrame], figures: dict[str, dict[str, Path]], titles: dict[str, str],
                missing: list[str], sources: list[str], model: str | None = None) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>PD pruning report</title>", f"<style>{CSS}</style></head><body>",
           "<h1>PD pruning report</h1>",
           f"<p>Generated {escape(now)} from {len(col.all)} record(s) in: {escape(', '.join(sources))}"
           + (f" (model {escape(model)} only)" if model else "") + ".</p>"]
    for t in tables:
        out.append(f"<h2>{escape(t.attrs['name'].replace('_', ' ').capitalize())} table</h2>")
        out.append(to_html(t))
    out += ["<h2>Figures</h2>"] if figures else []  # none with --no-plots: no empty section
    for name, paths in figures.items():
        out.append(f'<figure id="fig-{escape(name)}"><img alt="{escape(titles.get(name, name))}" src="{_img(paths["png"])}">'
                   f"<figcaption>{escape(titles.get(name, name))}</figcaption></figure>")
    if missing:  # what is not shown and why, failed cells first
        out.append('<h2>Notes</h2><ul class="notes">')
        out += [f'<li class="missing">{escape(m)}</li>' for m in missing]
        out.append("</ul>")
    out.append("<h2>Provenance</h2>")
    head = ["record", "kind", "method", "mode", "model", "seed", "versions", "hardware", "git commit", "created", "run key"]
    out.append('<table class="provenance"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>")
    for row in provenance_rows(col):
        out.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table></body></html>")
    return "\n".join(out) + "\n"
