"""Run lm-eval's own task definitions on local data files (no dataset hub).

For each task, a generated YAML `include:`s lm-eval's upstream YAML unchanged (prompt, choices,
target, metrics, split) and replaces only the data source with `custom_dataset`, lm-eval's
documented hook, pointing at `load_local` below. `load_local` turns the files of a data dir laid
out like `../shared/data` into the field layout of the Hugging Face dataset the upstream task
reads (bridges documented in each data folder's README). Splits the local data lacks (training
splits, only used for few-shot examples) are set to null.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from harness.errors import UsageError

# lm-eval task -> (files it needs, relative to the data dir; splits the local data provides)
TASK_FILES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "arc_easy": (("arc_easy/ARC-Easy-test.jsonl",), ("test",)),
    "arc_challenge": (("arc_challenge/ARC-Challenge-test.jsonl",), ("test",)),
    "hellaswag": (("hellaswag/hellaswag_validation.jsonl",), ("validation",)),
    "piqa": (("piqa/valid.jsonl", "piqa/valid-labels.lst"), ("validation",)),
    "winogrande": (("winogrande/dev.jsonl",), ("validation",)),
    "boolq": (("boolq/dev.jsonl",), ("validation",)),
    "openbookqa": (("openbookqa/test.jsonl", "openbookqa/dev.jsonl"), ("test", "validation")),
    "wikitext": (("wikitext2/wiki.test.raw",), ("test",)),
    "lambada_openai": (("lambada/lambada_test.jsonl",), ("test",)),
    "mmlu": (("mmlu/test", "mmlu/dev", "mmlu/val"), ("test", "dev", "validation")),
}
# Where lm-eval (pinned version) keeps each task's YAML, relative to lm_eval/tasks.
UPSTREAM_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "wikitext": "wikitext/wikitext.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}
SPLIT_KEYS = {"training_split": "train", "validation_split": "validation", "test_split": "test", "fewshot_split": None}


# fields each data file's rows must have (what lm-eval's upstream task or our bridge reads)
ROW_FIELDS = {
    "arc": ("question", "choices", "answerKey"), "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "piqa": ("goal", "sol1", "sol2"), "winogrande": ("sentence", "option1", "option2", "answer"),
    "boolq": ("question", "passage", "title", "answer"), "openbookqa": ("id", "question", "answerKey"),
    "lambada": ("text",),
}


RESTORE = "restore it (the README.md beside it names its source)"  # what a data-file error asks


def _jsonl(path: Path, fields: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file, each an object with `fields`; a UsageError names the file, line and field."""
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"data file {path}, line {n}: not valid JSON ({e.msg}, column {e.colno}); "
                                     f"a truncated or edited file? {RESTORE}") from None
                missing = [k for k in fields if k not in row] if isinstance(row, dict) else ["(a JSON object)"]
                if missing:
                    have = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise UsageError(f"data file {path}, line {n}: missing field {missing[0]!r} (it has: {have}); "
                                     f"each row needs {', '.join(fields)}")
                rows.append(row)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"data file {path}: unreadable ({e})") from None
    return rows


def _answers(path: Path, rows: list[dict], ok: Callable[[dict], bool], what: str | Callable[[dict], str]) -> list[dict]:
    """`rows`, each checked by `ok` (its answer names one of its choices): else lm-eval fails later naming nothing.
    `what` says what is wrong (or makes it from the row)."""
    for n, r in enumerate(rows, 1):
        if not ok(r):
            raise UsageError(f"data file {path}, row {n}: {what(r) if callable(what) else what}; {RESTORE}")
    return rows


def _arc(data: Path, name: str) -> dict[str, list[dict]]:
    path = data / TASK_FILES[name][0][0]
    labels = lambda r: r["choices"].get("label", []) if isinstance(r["choices"], dict) else []  # noqa: E731
    return {"test": _answers(path, _jsonl(path, ROW_FIELDS["arc"]), lambda r: r["answerKey"] in labels(r),
                             lambda r: f"answerKey {r['answerKey']!r} is not one of its choice labels {labels(r)}")}


def _hellaswag(data: Path) -> dict[str, list[dict]]:
    path = data / "hellaswag/hellaswag_validation.jsonl"
    rows = _jsonl(path, ROW_FIELDS["hellaswag"])
    ok = lambda r: str(r["label"]) in {str(i) for i in range(len(r["endings"] or []))}  # lm-eval: int(label)  # noqa: E731
    return {"validation": _answers(path, rows, ok, "label must index its endings")}


def _piqa(data: Path) -> dict[str, list[dict]]:
    rows = _jsonl(data / "piqa/valid.jsonl", ROW_FIELDS["piqa"])
    try:
        labels = [int(x) for x in _text(data / "piqa/valid-labels.lst").split()]
        bad = [y for y in labels if y not in (0, 1)]
        if bad:
            raise ValueError(f"label {bad[0]}")
    except ValueError as e:
        raise UsageError(f"data file {data}/piqa/valid-labels.lst: expected one 0/1 label per line ({e})") from None
    if len(rows) != len(labels):
        raise UsageError(f"{data}/piqa: valid.jsonl has {len(rows)} rows but valid-labels.lst has {len(labels)}")
    return {"validation": [{**r, "label": y} for r, y in zip(rows, labels)]}


def _winogrande(data: Path) -> dict[str, list[dict]]:
    path = data / "winogrande/dev.jsonl"
    rows = _jsonl(path, ROW_FIELDS["winogrande"])
    return {"validation": _answers(path, rows, lambda r: r["answer"] in ("1", "2"), "answer must be the string '1' or '2'")}


def _boolq(data: Path) -> dict[str, list[dict]]:
    # SuperGLUE's boolq (what lm-eval reads) prefixes the passage with its title.
    rows = _jsonl(data / "boolq/dev.jsonl", ROW_FIELDS["boolq"])
    return {"validation": [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}",
                            "idx": i, "label": int(bool(r["answer"]))} for i, r in enumerate(rows)]}


def _openbookqa_rows(path: Path) -> list[dict]:
    out = []
    for n, r in enumerate(_jsonl(path, ROW_FIELDS["openbookqa"]), 1):
        try:
            out.append({"id": r["id"], "question_stem": r["question"]["stem"],
                        "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                    "label": [c["label"] for c in r["question"]["choices"]]},
                        "answerKey": r["answerKey"]})
        except (KeyError, TypeError) as e:
            raise UsageError(f"data file {path}, row {n}: missing field {e} (needs question.stem and question.choices "
                             "with text and label)") from None
    return out


def _openbookqa(data: Path) -> dict[str, list[dict]]:
    ok = lambda r: r["answerKey"] in r["choices"]["label"]  # noqa: E731
    return {split: _answers(data / f"openbookqa/{f}", _openbookqa_rows(data / f"openbookqa/{f}"), ok,
                            "answerKey must be one of its choice labels") for split, f in (("test", "test.jsonl"),
                                                                                           ("validation", "dev.jsonl"))}


_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_pages(raw: str) -> list[str]:
    """Split wiki.test.raw into articles at top-level ` = Title = ` lines (heading kept, "\\n"-joined).

    This follows the document-level builder lm-eval's dataset uses: a page runs from its title
    line up to the next title line, lines joined with newlines.
    """
    pages, cur = [], []
    for line in raw.split("\n"):
        if _WIKI_TITLE.match(line) and cur:
            if "".join(cur).strip():
                pages.append("\n".join(cur))
            cur = []
        cur.append(line)
    if "".join(cur).strip():
        pages.append("\n".join(cur))
    return pages


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"data file {path}: unreadable ({e}); {RESTORE}") from None


def _wikitext(data: Path) -> dict[str, list[dict]]:
    raw = _text(data / "wikitext2/wiki.test.raw")
    return {"test": [{"page": p} for p in wikitext_pages(raw)]}


def _lambada(data: Path) -> dict[str, list[dict]]:
    return {"test": _jsonl(data / "lambada/lambada_test.jsonl", ROW_FIELDS["lambada"])}


def mmlu_subjects(data: Path) -> list[str]:
    test = data / "mmlu/test"
    if not test.is_dir():
        raise UsageError(f"data dir {data} has no mmlu/test folder (needed by task mmlu)")
    return sorted(p.name[: -len("_test.csv")] for p in test.glob("*_test.csv"))


def mmlu_rows(data: Path, subject: str, split_dir: str) -> list[dict]:
    path = data / "mmlu" / split_dir / f"{subject}_{split_dir}.csv"
    if not path.is_file():
        raise UsageError(f"missing data file {path} (needed by task mmlu_{subject})")
    rows = []
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    for row in reader:
        n = reader.line_num
        if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
            raise UsageError(f"data file {path}, line {n}: expected 6 columns (question, 4 choices, answer A-D), "
                             f"got {len(row)} column(s){' ending in ' + repr(row[-1][:20]) if row else ''}")
        q, a, b, c, d, ans = row
        rows.append({"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans.strip())})
    return rows


def _mmlu(data: Path, subject: str) -> dict[str, list[dict]]:
    return {split: mmlu_rows(data, subject, d) for split, d in (("test", "test"), ("dev", "dev"), ("validation", "val"))}


LOADERS: dict[str, Callable[..., dict[str, list[dict]]]] = {
    "arc_easy": lambda d: _arc(d, "arc_easy"),
    "arc_challenge": lambda d: _arc(d, "arc_challenge"),
    "hellaswag": _hellaswag,
    "piqa": _piqa,
    "winogrande": _winogrande,
    "boolq": _boolq,
    "openbookqa": _openbookqa,
    "wikitext": _wikitext,
    "lambada_openai": _lambada,
}


def local_rows(task: str, data_dir: str | Path, subject: str | None = None) -> dict[str, list[dict]]:
    """Rows per split of `task` read from `data_dir`, in the upstream dataset's field layout."""
    data = Path(data_dir)
    splits = _mmlu(data, subject or "") if task == "mmlu" else LOADERS[task](data)
    empty = [k for k, rows in splits.items() if not rows]
    if empty:  # else lm-eval fails later with an IndexError that names nothing
        files = ", ".join(str(data / f) for f in TASK_FILES[task][0])
        raise UsageError(f"task {task}{' (' + subject + ')' if subject else ''}: its {empty[0]} split has no rows "
                         f"(data: {files}); restore them (the task folder's README.md names their source)")
    return splits


def load_local(harness_task: str, harness_data_dir: str, harness_subject: str | None = None, **_: Any):
    """lm-eval `custom_dataset` hook: a `datasets.DatasetDict` of the local files."""
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in
                                 local_rows(harness_task, harness_data_dir, harness_subject).items()})


def check_files(tasks: Iterable[str], data_dir: Path) -> None:
    """Raise a `UsageError` naming the first data file a task needs that is missing."""
    if not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir}: no such directory (expected a folder laid out like ../shared/data)")
    for task in tasks:
        for rel in TASK_FILES[task][0]:
            if not (data_dir / rel).exists():
                raise UsageError(f"missing data file {data_dir / rel} (needed by task {task}); "
                                 f"--data-dir must be laid out like ../shared/data")


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def write_overrides(tasks: Iterable[str], data_dir: Path, out_dir: Path, upstream: dict[str, Path]) -> list[str]:
    """Write one override YAML per lm-eval task into `out_dir`; return the task names written.

    `upstream` maps an lm-eval task name to its YAML file (from `TaskManager.task_index`).
    """
    written = []
    data_dir = data_dir.resolve()
    for task in tasks:
        if task == "mmlu":
            units = [(f"mmlu_{s}", "mmlu", s) for s in mmlu_subjects(data_dir)]
        else:
            units = [(task, task, None)]
        provided = set(TASK_FILES[task][1])
        for name, loader_task, subject in units:
            if name not in upstream:
                raise UsageError(f"lm-eval has no task {name!r} to attach local data to")
            lines = [f"include: {_yaml_str(str(upstream[name]))}", f"task: {name}",
                     "custom_dataset: !function harness.quality.tasks.load_local",
                     "dataset_kwargs:", f"  harness_task: {loader_task}",
                     f"  harness_data_dir: {_yaml_str(str(data_dir))}"]
            if subject:
                lines.append(f"  harness_subject: {subject}")
            lines += [f"{key}: null" for key, split in SPLIT_KEYS.items() if split and split not in provided]
            if "test" in provided and not provided & {"train", "validation"}:
                # --num-fewshot draws from the scored test split then; lm-eval leaves the item out of its own
                # examples only when the few-shot split is named and equals the test split (api/task.py)
                lines.append("fewshot_split: test")
            (out_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n")
            written.append(name)
    return written


def task_manager(tasks: Iterable[str], data_dir: Path | None, workdir: Path | None = None):
    """An lm-eval `TaskManager` whose `tasks` read `data_dir` (or the hub when `data_dir` is None).

    Its override YAMLs go into `workdir`, which the caller removes once the tasks are built (without one,
    a new temporary folder that outlives the call)."""
    from lm_eval.tasks import TaskManager

    if data_dir is None:
        return TaskManager()
    tasks = [t for t in tasks if t in TASK_FILES]
    check_files(tasks, data_dir)
    out = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="harness-tasks-"))
    upstream = upstream_yamls(data_dir if "mmlu" in tasks else None)
    names = write_overrides(tasks, data_dir, out, upstream)
    # Index only the folders of the upstream YAMLs these tasks use (MMLU's holds its group files),
    # then the overrides, which win: indexing all of lm-eval's ~14,000 task YAMLs cost ~8 s per run.
    folders = sorted({str(upstream[name].parent) for name in names})
    return TaskManager(include_path=[*folders, str(out)], include_defaults=False)


def upstream_yamls(data_dir: Path | None = None) -> dict[str, Path]:
    """Paths of the installed lm-eval's task YAMLs for the tasks with local data (and MMLU subjects)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    paths = {name: root / rel for name, rel in UPSTREAM_YAML.items()}
    if data_dir is not None:
        paths.update({f"mmlu_{s}": root / "mmlu" / "default" / f"mmlu_{s}.yaml" for s in mmlu_subjects(data_dir)})
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"lm-eval {getattr(lm_eval, '__version__', '?')} lacks task files {missing[:3]}; "
                           "the harness pins lm-eval==0.4.13")
    return paths



@contextlib.contextmanager
def without_env_report():
    """Skip lm-eval's `add_env_info` and `get_git_commit_hash` while inside: on every `simple_evaluate` they build
    torch's environment report (`pip list` and other subprocesses, 1-4 s a call) and run `git describe` in the
    current folder (outside a repository it prints "fatal: not a git repository" past -q; inside one it names that
    repository, not the harness), into results fields the harness never reads; records carry the harness's own
    `environment`, and its lm-eval results file the harness's commit (`lm_eval_json`)."""
    import lm_eval.evaluator as ev

    saved = ev.add_env_info, ev.get_git_commit_hash
    ev.add_env_info, ev.get_git_commit_hash = (lambda results: None), (lambda: None)
    try:
        yield
    finally:
        ev.add_env_info, ev.get_git_commit_hash = saved
