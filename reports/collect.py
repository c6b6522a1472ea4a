"""Gather run records from result folders for reporting (torch-free).

A report may combine several folders (e.g. a quality run and a latency run). Records are split by
kind: latency records carry `config.kind == "latency"`, everything else is a quality record.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from harness.store.records import (
    RecordError,
    RunRecord,
    is_record_file,
    load,
    load_failures,
    one_of_a_cell,
    record_files_under,
    run_files_under,
    unfinished_hint,
)

# Metric shown per task under each named convention. `paper` is lm-eval's usual reporting (and the
# PDTrim / ShortGPT papers'): length-normalised accuracy where answer lengths differ a lot.
CONVENTIONS: dict[str, dict[str, str]] = {
    "paper": {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"},
    "acc_norm": {},  # acc_norm wherever the task reports it
    "acc": {},  # acc everywhere
}
CONVENTION_TEXT = {
    "paper": "acc_norm for HellaSwag, ARC-Challenge and OpenBookQA, acc elsewhere",
    "acc_norm": "acc_norm wherever the task reports it, acc elsewhere",
    "acc": "acc everywhere",
}


class ReportError(ValueError):
    """Bad report input (missing folder, unreadable record, unknown convention); the CLI exits 2."""


def metric_for(task: str, available: dict, convention: str, record: RunRecord | None = None) -> str | None:
    """The metric to show for `task` given the metrics a record has. Tasks without acc/acc_norm
    (perplexities, long-context tasks) keep their primary metric: the one `record` stored for a long-context task (a
    plug-in's own), else the package's convention. Under `paper`, a task not named in CONVENTIONS shows the metric its
    record stored (`lm_eval.metric_convention`: a plug-in lm-eval task's `table_metric`), else acc."""
    from harness.store.records import primary_metric

    if convention not in CONVENTIONS:
        raise ReportError(f"unknown metric convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")
    if "acc" not in available and "acc_norm" not in available:
        m = primary_metric(task, record)
        return m if m in available else None
    if convention == "acc":
        want = "acc"
    elif convention == "acc_norm":
        want = "acc_norm" if "acc_norm" in available else "acc"
    else:
        want = CONVENTIONS["paper"].get(task) or primary_metric(task, record)  # a plug-in task's: its record's
    return want if want in available else None


def own_metrics(tasks: list[str], records: list[RunRecord]) -> dict[str, str]:
    """The tasks whose `paper` metric is their records' own other than acc (a plug-in lm-eval task's `table_metric`,
    e.g. acc_norm): what CONVENTION_TEXT does not say, for the caption. Perplexity columns name theirs already."""
    from harness.store.records import LOWER_IS_BETTER

    return {t: m for t in tasks if t not in CONVENTIONS["paper"] for r in records
            if (m := metric_for(t, r.scores.get(t, {}), "paper", r)) not in (None, "acc") and m not in LOWER_IS_BETTER}


@dataclass
class Collection:
    quality: list[RunRecord] = field(default_factory=list)
    latency: list[RunRecord] = field(default_factory=list)
    sources: dict[int, Path] = field(default_factory=dict)  # id(record) -> file
    skipped: list[str] = field(default_factory=list)  # files that are not readable records, and why
    _models: tuple = field(default=((), {}), repr=False, compare=False)  # (sizes of the lists, id -> model label)

    def source(self, r: RunRecord) -> Path:
        return self.sources[id(r)]

    @property
    def all(self) -> list[RunRecord]:
        return [*self.quality, *self.latency]

    def folder(self, r: RunRecord) -> Path:
        return self.sources[id(r)].parent

    def model(self, r: RunRecord) -> str:
        """`r`'s model as the tables name it. Records of one model folder or GGUF file typed another way (`m` from
        its parent, `/x/m` from elsewhere) share a name: the shortest way it was typed."""
        size = (len(self.quality), len(self.latency))  # records are only ever added: a new one changes the sizes
        if self._models[0] != size or id(r) not in self._models[1]:
            self._models = (size, model_labels(self.all))
        return self._models[1][id(r)]

    def label(self, r: RunRecord) -> str:
        """Method name, plus its folder when the same (model, method, mode, kind) occurs in several
        folders (e.g. a --limit 100 and a --limit 1000 run): the shortest end of the folder's path
        that tells them apart (`a/run` and `b/run`, but `other` for a third folder `c/other`)."""
        same = [o for o in (self.latency if is_latency(r) else self.quality)
                if (self.model(o), o.method, o.mode) == (self.model(r), r.method, r.mode)]
        return r.method if len(same) < 2 else f"{r.method} ({folder_suffix(self.folder(r), [self.folder(o) for o in same])})"


def folder_suffix(folder: Path, folders: list[Path]) -> str:
    """The shortest end of `folder`'s path that none of the other `folders` ends with (its whole
    path when every end is shared)."""
    parts, others = folder.parts, [f.parts for f in folders if f != folder]
    for k in range(1, len(parts) + 1):
        if all(o[-k:] != parts[-k:] for o in others):
            return Path(*parts[-k:]).as_posix()
    return folder.as_posix()


def natural_key(text: str) -> tuple:
    """Sort key reading runs of digits as numbers: `x@k=2` before `x@k=10`."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", text)))


def is_latency(r: RunRecord) -> bool:
    return r.config.get("kind") == "latency"


def model_name(r: RunRecord) -> str:
    """The model's name, or the model as typed (`--model`) when it has none."""
    return str(r.model.get("name") or r.config.get("model") or "?")


def same_model(a: RunRecord, b: RunRecord) -> bool:
    """Whether `a` and `b` were made with one model: for a local model folder or GGUF file, the same weights digest
    (a copy elsewhere is the same model; a folder whose weights changed is not) or, without both digests, the same
    resolved path; else the same name or typed model."""
    where_a, where_b = a.model_location(), b.model_location()
    if where_a is None or where_b is None:
        return where_a == where_b and model_name(a) == model_name(b)
    wa, wb = a.inputs(), b.inputs()
    if wa.get("model") and wb.get("model") and wa.get("version") == wb.get("version"):
        return wa["model"] == wb["model"]
    return where_a == where_b


def model_labels(records: list[RunRecord]) -> dict[int, str]:
    """id(record) -> its model's label: records of one model (`same_model`, transitively) share the shortest name
    any of them was typed with; models that would share a label get their path added, then their weights digest."""
    groups: list[list[RunRecord]] = []
    for r in records:
        hit = [g for g in groups if any(same_model(r, o) for o in g)]
        groups = [g for g in groups if all(g is not h for h in hit)] + [[r, *(o for g in hit for o in g)]]

    def label(g: list[RunRecord], detail: int) -> str:
        name = min({model_name(r) for r in g}, key=lambda n: (len(n), n))
        where = min((w for r in g if (w := r.model_location())), default=None)
        weights = min((f"weights {d[:12]}" for r in g if (d := r.inputs().get("model"))), default=None)
        parts = [x for x in (where, weights)[:detail] if x]
        return f"{name} ({', '.join(parts)})" if parts else name

    labels = [label(g, 0) for g in groups]
    for detail in (1, 2):
        labels = [label(g, detail) if labels.count(lab) > 1 else lab for g, lab in zip(groups, labels)]
    return {id(r): lab for g, lab in zip(groups, labels) for r in g}


def record_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".json" or path.name.endswith((".partial.json", ".failed.json")):  # summary.csv, a note
            hint = f"give the run folder: {path.parent}" if any(is_record_file(p) for p in path.parent.iterdir()) \
                else "give a run folder (one holding <method>__<mode>.json records, e.g. results/reference/quality)"
            raise ReportError(f"{path}: not a run record (a run's records are its <method>__<mode>.json files); {hint}")
        return [path]
    if not path.is_dir():
        raise ReportError(f"{path}: no such file or folder (give folders of run records, e.g. results/issue3/default)")
    return record_files_under(path)


def collect(paths: list[Path]) -> Collection:
    """Load every record under `paths` (folders are searched recursively), each file once."""
    col, seen, only_failed = Collection(), set(), []
    for path in paths:
        files = record_files(Path(path))
        if not files:
            failed = failure_notes([Path(path)])
            if not failed:
                raise ReportError(f"{path}: no run records (<method>__<mode>.json) found{unfinished_hint(Path(path))}")
            only_failed.append(f"{path}: no run records; failed cells: {'; '.join(failed)}")
            continue  # its failed cells are notes of the report (docs/reports.md), the other inputs still render
        for f in files:
            if f.resolve() in seen:  # inputs that overlap (a folder and its subfolder or file): read once
                continue
            seen.add(f.resolve())
            try:
                r = load(f)
            except RecordError as e:  # one bad file must not hide the others; the report names it
                col.skipped.append(f"{e}; skipped")
                continue
            _add(col, r, f)
    if col.skipped and not col.all:
        raise ReportError("no readable run records: " + "; ".join(col.skipped))
    if only_failed and not col.all:
        raise ReportError("; ".join(only_failed))
    return col


def _add(col: Collection, r: RunRecord, f: Path) -> None:
    """Add `r` (read from `f`) to `col`, unless its folder already gave a record of its cell (a renamed copy,
    `x__disaggregated (copy).json`): rows of one label could not be told apart, and a ratio or pair against
    the copy would be silent. The record in the cell's own file name is kept, else the first; the other is a note."""
    lst = col.latency if is_latency(r) else col.quality
    twin = next((o for o in lst if (o.method, o.mode) == (r.method, r.mode) and col.folder(o).resolve() == f.parent.resolve()), None)
    if twin is not None:
        kept, _, why = one_of_a_cell(col.source(twin), twin, f, r)
        col.skipped.append(why)
        if kept != f:
            return
        lst.remove(twin)
        del col.sources[id(twin)]
    lst.append(r)
    col.sources[id(r)] = f


# Config fields that differ between the records of one run, or name which cells a run made (tasks,
# latency workloads), rather than the settings its records share; placement changes no result.
CELL_FIELDS = frozenset({"methods", "modes", "tasks", "overrides", "method_options", "plans_from", "plan_reused_from",
                         "batch_sizes_used", "max_length_used", "device_map", "max_memory", "offload_folder",
                         "prompt_tokens", "decode_tokens", "batch_sizes", "decode_modes", "bandwidths_gbit"})
# fields added to RunConfig later, left out of records at their default (as `RunConfig._canonical` does)
LATER_DEFAULTS = {"num_fewshot": 0, "apply_chat_template": False, "model_args": None}


def configuration(r: RunRecord) -> str:
    """The settings `r` shares with the other records of its run: its config without the method's own
    options and the run's lists of cells (what `run_key` hashes, apart from the method). The data folder
    counts by kind, not path (a clone elsewhere reads the same files; `same_configuration` compares their
    digests): a local folder or lm-eval's hub datasets; a latency record's not at all (its plan is its own). The
    --include-path folders count by number (`same_configuration` compares their digests, folder by folder). The
    model is left to `same_model` (a model folder typed two ways is one model)."""
    keep = {k: v for k, v in r.config.items()
            if k not in CELL_FIELDS and k != "model" and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
    if "data_dir" in keep:
        keep["data_dir"] = None if is_latency(r) else ("local folder" if keep["data_dir"] else None)
    if isinstance(keep.get("include_path"), list):  # as many folders, wherever they lie (`_include_digests`)
        keep["include_path"] = ["local folder"] * len(keep["include_path"])
    return json.dumps(keep, sort_keys=True, default=str)


def differing_settings(records: list[RunRecord]) -> dict[str, list[str]]:
    """Setting -> its values, for the settings (`configuration`'s, and the weights dtype `--dtype auto` resolved to,
    where recorded) in which `records` differ: rows a table puts side by side (its Avg, its bold) although they
    were not run alike."""
    rows = [{**json.loads(configuration(r)), "weights dtype": r.model.get("dtype")} for r in records]
    if _other_include_files(records):  # folders that held other files: named by path, as the runs gave them
        rows = [{**row, "include_path": r.config.get("include_path")} for row, r in zip(rows, records)]
    keys = sorted({k for row in rows for k in row})
    values = {k: {json.dumps(row.get(k), sort_keys=True, default=str).strip('"') for row in rows
                  if not (k == "weights dtype" and row.get(k) is None)} for k in keys}
    return {k: sorted(vs, key=natural_key) for k, vs in values.items() if len(vs) > 1}  # limit 24 / 100 / 1000


def _data_digests(r: RunRecord) -> dict:
    """Task -> sha256 of the data files `r` was scored on ({} for records made before input digests)."""
    return r.inputs().get("data") or {}


def _other_include_files(records: list[RunRecord]) -> bool:
    """Whether two of `records` were made from --include-path folders that held other files (the n-th folders'
    digests differ, where both records keep them): a copy at another path is not another configuration, those are."""
    held: dict[int, set[str]] = {}
    for r in records:
        for i, d in enumerate(_include_digests(r)):
            if d:
                held.setdefault(i, set()).add(json.dumps(d, sort_keys=True))
    return any(len(v) > 1 for v in held.values())


def _include_digests(r: RunRecord) -> list:
    """The digests of what `r`'s --include-path folders held, in the order given (None for a folder without)."""
    held = r.inputs().get("include") or {}
    return [held.get(f) for f in r.config.get("include_path") or []]


def task_options(r: RunRecord, task: str) -> object:
    """The harness options of `task` (e.g. pd_ppl's prompt lengths) stored with `r`; None when none."""
    return ((r.lm_eval.get("tasks") or {}).get(task, {}).get("harness_task") or {}).get("options")


def same_configuration(a: RunRecord, b: RunRecord) -> bool:
    """Whether `a` and `b` were run with the same settings, so that one can be a reference for the
    other: same configuration, the same weights dtype where both recorded what `--dtype auto` resolved to (bfloat16
    on a GPU, float32 on a CPU: half or twice the KV bytes), on the tasks both scored the same task options and data,
    and what their --include-path folders held the same where both records keep its digests."""
    common = set(a.scores) & set(b.scores)
    da, db = _data_digests(a), _data_digests(b)
    dtypes = {r.model.get("dtype") for r in (a, b)}
    return configuration(a) == configuration(b) and same_model(a, b) and all(task_options(a, t) == task_options(b, t) for t in common) \
        and all(da[t] == db[t] for t in common if t in da and t in db) and (None in dtypes or len(dtypes) == 1) \
        and all(x == y for x, y in zip(_include_digests(a), _include_digests(b)) if x and y)


def reference(records: list[RunRecord], r: RunRecord, method: str = "unpruned", col: Collection | None = None,
              same_run: bool = False) -> RunRecord | None:
    """The record of `records` by `method` with `r`'s configuration that `r` is compared with (a
    ratio or a paired difference); None when there is none. With `col` the choice does not depend on
    the order of the inputs: the record of `r`'s own folder first, then one that scored every task `r`
    scored, then the first by file path. `same_run` (needs `col`): only a record of `r`'s own folder
    (latency samples are comparable within one interleaved run, not across runs)."""
    found = [o for o in records if o.method == method and same_configuration(o, r)]
    if col is None:
        return next((o for o in found if set(r.scores) <= set(o.scores)), found[0] if found else None)
    if same_run:
        found = [o for o in found if col.folder(o) == col.folder(r)]
    return min(found, default=None, key=lambda o: (col.folder(o) != col.folder(r), not set(r.scores) <= set(o.scores),
                                                   natural_key(str(col.source(o)))))


def models(col: Collection) -> dict[str, list[Path]]:
    """Model name -> the files of its records, in a stable order."""
    out: dict[str, list[Path]] = {}
    for r in col.all:
        out.setdefault(col.model(r), []).append(col.source(r))
    return {m: sorted(fs, key=str) for m, fs in sorted(out.items())}


def _models_text(col: Collection) -> str:
    """"'A' (a/x.json, ...) and 'B' (b/y.json)": each model with its first file (and '...' when more)."""
    parts = [f"{m!r} ({fs[0]}{', ...' if len(fs) > 1 else ''})" for m, fs in models(col).items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _aliases(col: Collection) -> list[str]:
    return sorted({str(r.config["model"]) for r in col.all if r.config.get("model")} - set(models(col)))


def select_model(col: Collection, name: str) -> Collection:
    """The records of one model: its name as the tables show it (`Collection.model`), its own name, or the model as
    any of its records typed it (e.g. `smollm2-135m`)."""
    chosen = {col.model(r) for r in col.all if name in (col.model(r), model_name(r), str(r.config.get("model")))}
    keep = [r for r in col.all if col.model(r) in chosen]
    if not keep:
        also = _aliases(col)
        raise ReportError(f"--model {name!r} matches no record; models present: {_models_text(col)}"
                          + (f" (config names: {', '.join(also)})" if also else ""))
    out = Collection()
    for r in keep:
        (out.latency if is_latency(r) else out.quality).append(r)
        out.sources[id(r)] = col.source(r)
    return out


def require_one_model(col: Collection, what: str = "the figures compare methods on one model") -> None:
    """ReportError naming each model and a file of it when `col` mixes models."""
    ms = models(col)
    if len(ms) > 1:
        also = _aliases(col)
        raise ReportError(f"records of {len(ms)} models: {_models_text(col)}: {what}; pick one with --model NAME"
                          + (f" (or a config name: {', '.join(also)})" if also else "")
                          + ", or pass --no-plots (tables group rows by model)")


def error_line(error: object, most: int = 300) -> str:
    """A stored error message as a note shows it: on one line, cut to `most` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= most else text[:most - 3] + "..."


def failure_notes(paths: list[Path], col: Collection | None = None) -> list[str]:
    """One line per failed-cell note (`<method>__<mode>.failed.json`) under `paths` (searched
    recursively, like records). With `col` (e.g. after --model), notes in a folder whose records all
    left the collection are skipped: they belong to another model's run."""
    kept = {col.source(r).parent for r in col.all} if col is not None else set()
    folders: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            real = {f.resolve() for f in folders}
            folders += [f for f in sorted({p.parent for p in run_files_under(path) if p.name.endswith(".failed.json")}) if f.resolve() not in real]
    lines = []
    for folder in folders:
        has_records = any(is_record_file(p) for p in folder.glob("*__*.json"))
        if col is not None and has_records and folder not in kept:
            continue
        for note in load_failures(folder):
            err = error_line(note.get("error", ""))
            also = " (a record for this cell is present too)" if \
                (folder / f"{note.get('method')}__{note.get('mode')}.json").exists() else ""
            where = f"in plug-in {note['plugin']}; " if isinstance(note.get("plugin"), str) else ""
            latency = note.get("run") == "latency"  # a latency run's failed plan (harness/run/plugin_faults.py)
            rerun = "; no record until it is fixed and the same latency command rerun (which reuses the other " \
                "methods' records)" if latency and not also else ""
            lines.append(f"{note.get('method', '?')}/{note.get('mode', '?')}{' (latency)' if latency else ''} failed in "
                         f"{folder}: {note.get('error_type', 'error')}: {err}{also} ({where}details: {note['file']}){rerun}")
    return lines
