"""Digests of a run's inputs that its configuration names only by path: the model's weights and the data
files of its tasks. A record keeps them (`extra.inputs`), so a rerun after the files behind a path
changed does not reuse records made from the old files, and `--plans-from` does not replay a plan
made on other weights (run keys name the path, not the content)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from harness.errors import UsageError


def _files_sha256(paths: list[Path]) -> str:
    """sha256 (16 hex) of the files under `paths` (files, or folders read recursively), names and bytes."""
    h = hashlib.sha256()
    for root in paths:
        for f in sorted([root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())):
            h.update(f"{f.relative_to(root.parent)}\0".encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def task_data_files(task: str, data_dir: Path | None, options: Any = None) -> list[Path]:
    """The files (or folders) `task` reads: an lm-eval task's local data in `data_dir`, or what a long-context task's
    `input_files` names under `options` (default: its defaults), by default its `data_files` in `data_dir` (none for a
    synthetic task such as passkey)."""
    from harness.quality import local_tasks, long_tasks

    if long_tasks.is_long_task(task):
        cls = long_tasks.get(task)
        return cls.input_files(data_dir, cls.Config() if options is None else options)
    return _present(data_dir, local_tasks.get(task).files) if data_dir and local_tasks.is_local_task(task) else []


def _present(data_dir: Path, rel) -> list[Path]:
    """The paths of `rel` (relative to `data_dir`) that exist there."""
    return [data_dir / r for r in rel if (data_dir / r).exists()]


VERSION = 2  # of the digests below; a record with another version is compared on its data digests only


def weights_fingerprint(model) -> str:
    """sha256 (16 hex) of the parameters' names, shapes and up to ~1,000 evenly strided values of each (plus the
    first and last 8), rounded to bfloat16: the same weights give the same digest wherever the files lie, loaded
    in float32 or bfloat16 (float16's own rounding and range differ: another digest, as its run key differs);
    an edit anywhere in a tensor of up to ~1,000 values, or of a stride's worth in a larger one, changes it."""
    import torch

    from harness.pd import arch

    h = hashlib.sha256()
    arch.hash_parameters(h, model, lambda flat: arch.strided_sample(flat).to(torch.bfloat16), with_dtype=False)
    return h.hexdigest()[:16]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_digests(loaded) -> dict[str, str]:
    """The weights', the config's (less its path, dtype and version) and the tokenizer's (vocabulary, special
    tokens, chat template) digests: what a model folder or GGUF file holds besides its path."""
    config = {k: v for k, v in loaded.model.config.to_dict().items()
              if not k.startswith("_") and k not in ("dtype", "torch_dtype", "transformers_version")}
    tok = loaded.tokenizer
    vocab = {str(k): v for k, v in tok.get_vocab().items()} if hasattr(tok, "get_vocab") else None  # bytes keys too
    tokenizer = {"vocab": vocab, "special": list(getattr(tok, "all_special_tokens", [])),
                 "chat_template": getattr(tok, "chat_template", None)}
    return {"model": weights_fingerprint(loaded.model), "config": _sha(config), "tokenizer": _sha(tokenizer)}


def digests(cfg, loaded=None, prepared=None) -> dict[str, Any]:
    """{"version", "model", "config", "tokenizer": model_digests (None without `loaded`; the weights' None with a
    --device-map: offloaded weights are not all in memory), "data": {task: sha256 of its files}} for the run's tasks,
    with `prepared` whose methods calibrate, "calibration": {source: sha256 of the files it reads}, and with
    --include-path, "include": `include_digests`."""
    from harness.quality.calibration import SOURCE_FILES

    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    options = prepared.task_options if prepared is not None else {}
    data = {t: _files_sha256(files) for t in cfg.tasks if (files := task_data_files(t, data_dir, options.get(t)))}
    calibrates = prepared is not None and any(m.needs_calibration for m in prepared.methods.values())
    calibration = {s: _files_sha256(files) for s in (prepared.calib_config.sources if calibrates else ())
                   if data_dir and (files := _present(data_dir, SOURCE_FILES[s]))}
    model = model_digests(loaded) if loaded is not None else {}
    code = _plugin_code(cfg, prepared)
    include = include_digests(getattr(cfg, "include_path", None) or ())
    return {"version": VERSION, "model": None if cfg.device_map else model.get("model"), "config": model.get("config"),
            "tokenizer": model.get("tokenizer"), "data": data, **({"calibration": calibration} if calibration else {}),
            **({"code": code} if code else {}), **({"include": include} if include else {})}


def include_digests(folders) -> dict[str, dict[str, str]]:
    """{folder: {"files": sha256 of its YAML and Python files (and the YAMLs elsewhere they include), "data": sha256 of
    the local data files its YAMLs name}} for the --include-path folders (`harness.quality.include_tasks`)."""
    from harness.quality import include_tasks

    return {f: {"files": _files_sha256(include_tasks.code_files(Path(f))),
                "data": _files_sha256(include_tasks.data_files(Path(f)))} for f in folders}


def _plugin_code(cfg, prepared) -> dict[str, dict]:
    """{"methods": {name: {module: digest}}, "tasks": {task: ...}} of the plug-in code the run's methods,
    long-context tasks and lm-eval tasks on local data (their loaders) run (methods/plugin_code.py); {} when they
    are all the package's own."""
    from harness.quality import local_tasks, long_tasks
    from methods.plugin_code import plugin_code

    def task_class(t: str):  # a local task's loader runs only with a data dir (else lm-eval reads the hub)
        return long_tasks.get(t) if long_tasks.is_long_task(t) else \
            local_tasks.get(t) if cfg.data_dir and local_tasks.is_local_task(t) else None

    methods = {n: c for n, m in (prepared.methods.items() if prepared is not None else ()) if (c := plugin_code(m))}
    tasks = {t: c for t in cfg.tasks if (cls := task_class(t)) is not None and (c := plugin_code(cls))}
    return {k: v for k, v in (("methods", methods), ("tasks", tasks)) if v}


def differences(then: dict | None, now: dict, calibrates: bool = False, method: str | None = None,
                plan: dict | None = None) -> list[str]:
    """What differs between the inputs a record or resume state was made from and this run's (nothing when it
    predates digests, or for a digest either side lacks; the model's only between digests of one version; the
    calibration data's only for a method that `calibrates`; the plug-in code of `method` and of the long-context
    tasks only when `then` has code digests)."""
    if not then:
        return []
    out = []
    names = {"model": "the model's weights", "config": "the model's config", "tokenizer": "the tokenizer"}
    for key, what in names.items() if then.get("version") == now.get("version") else ():
        if then.get(key) and now.get(key) and then[key] != now[key]:
            out.append(f"{what} ({key} digest {then[key]} then, {now[key]} now)")
    if changed := _changed(then.get("data"), now.get("data")):
        out.append(f"the data files of {', '.join(changed)}")
    if calibrates and (changed := _changed(then.get("calibration"), now.get("calibration"))):
        out.append(f"the calibration data ({', '.join(changed)})")
    out += _include_changes(then.get("include"), now.get("include"))
    return out + (_code_changes(then["code"], now.get("code") or {}, method, plan) if "code" in then else [])


def _include_changes(then: dict | None, now: dict | None) -> list[str]:
    """What changed under each --include-path folder both digests know: its task YAMLs and code, the data they name."""
    what = {"files": "the task YAMLs and Python files under --include-path {}",
            "data": "the data files named by the task YAMLs under --include-path {}"}
    out = []
    for folder, parts in then.items() if isinstance(then, dict) and isinstance(now, dict) else ():
        here = now.get(folder) if isinstance(now.get(folder), dict) else {}
        parts = parts if isinstance(parts, dict) else {}
        out += [text.format(folder) for key, text in what.items() if here.get(key) not in (None, parts.get(key))]
    return out


def include_here(then: Any, folders_then: Any, folders_now: tuple[str, ...] | None) -> Any:
    """`then` (a record's or resume state's input digests) with the digests of its --include-path folders
    (`folders_then`, in the order given) under the folders of this run that stand for them, by position, where the
    folders moved (`reuse.moved_folders`): a copy of the folder elsewhere is compared with what it was made from."""
    from harness.run.reuse import moved_folders

    if not isinstance(then, dict) or not isinstance(then.get("include"), dict) or \
            not moved_folders(folders_then, folders_now):
        return then
    return {**then, "include": {now: then["include"][old] for old, now in zip(folders_then, folders_now)
                                if old in then["include"]}}


def _code_changes(then: dict, now: dict, method: str | None, plan: dict | None = None) -> list[str]:
    """'the code of plug-in method x (module m)' for `method` (with the plug-in KV policy its stored `plan` names) and
    each task whose plug-in code changed."""
    from methods.plugin_code import changes, with_policy

    def now_of(key: str, name: str) -> dict | None:
        here = now.get(key, {}).get(name)
        return with_policy(then.get(key, {}).get(name), here or {}, plan) if key == "methods" else here

    kinds = [("method", "methods", [method] if method else []), ("task", "tasks", sorted(then.get("tasks", {})))]
    return [f"the code of plug-in {kind} {name} ({', '.join(mods)})" for kind, key, names in kinds for name in names
            if (mods := changes(then.get(key, {}).get(name), now_of(key, name)))]


def with_plan_code(digests: dict, method: str, plan: dict) -> dict:
    """`digests` (`digests()`) with the plug-in code of the KV policy `plan` names added to `method`'s code digests
    (`methods.plugin_code.policy_code`), as the record of that plan keeps them."""
    from methods.plugin_code import policy_code

    extra = policy_code(plan)
    if not extra:
        return digests
    code = dict(digests.get("code") or {})
    methods = dict(code.get("methods") or {})
    methods[method] = dict(sorted({**(methods.get(method) or {}), **extra}.items()))
    return {**digests, "code": {**code, "methods": methods}}


def _changed(then: dict | None, now: dict | None) -> list[str]:
    """The names whose digest in `then` differs from `now`'s (a name `now` lacks is not compared)."""
    return sorted(k for k, d in (then or {}).items() if (now or {}).get(k) not in (None, d))


def stale_results(doc: dict, is_record: bool, cfg, task_options: dict, prefix: list[int] | None = None) -> list[str]:
    """Why a long-context task's stored results in a record (or resume state) no longer hold for this run's
    options (`LongTask.stale`, e.g. passkey's samples chosen by an older --limit order), or were made by another
    version of the task than its `reusable_versions` (and its `reusable_without_prefix`, where the tokenizer's
    default prefix `prefix` is empty; None: not known here, left to the run that loads the tokenizer)."""
    from harness.quality import long_tasks

    out = []
    stored = ((doc.get("lm_eval") or {}).get("tasks") or {}) if is_record else (doc.get("tasks") or {})  # a resume state
    for task, options in task_options.items():
        task_cls = long_tasks.get(task)
        result = ({"items": (doc.get("extra") or {}).get("items", {}).get(task), "n_samples": (doc.get("n_samples") or {})
                   .get(task)} if is_record else (doc.get("tasks") or {}).get(task))
        why = task_cls.stale(result, options, cfg.limit) if result else None
        out += [why] if why else []
        then = ((stored.get(task) or {}).get("harness_task") or {}).get("version")
        if then is not None and then != task_cls.version and then not in task_cls.reusable_versions and not (
                then in task_cls.reusable_without_prefix and not prefix):
            why = f" (its prompts lacked this tokenizer's prefix {prefix})" if then in task_cls.reusable_without_prefix else ""
            out.append(f"{task} results made by version {then} of the task, which is version {task_cls.version} now{why}")
    return out


def refuse_stale_work(cfg, prepared, out_dir: Path, now: dict, prefix: list[int] | None = None) -> None:
    """A UsageError naming every record or resume state of the run's cells in `out_dir` made from other files
    behind the same paths (`now`: this run's `digests`), or whose long-context results no longer hold
    (`stale_results`, with the tokenizer's default `prefix`): reusing them would mix old and new inputs under one
    configuration."""
    from harness.store import records as rec

    found = []
    for name, mode in ((n, m) for n in prepared.methods for m in cfg.modes):
        for path in (out_dir / rec.record_filename(name, mode), out_dir / rec.partial_filename(name, mode)):
            try:
                doc = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
            except (OSError, ValueError):
                continue  # unreadable: the run's own checks name it
            if not isinstance(doc, dict):  # not a record or resume state at all: the same
                continue
            is_record = path.name == rec.record_filename(name, mode)
            then = (doc.get("extra") or {}).get("inputs") if is_record else doc.get("inputs")
            folders = (doc.get("config") or {}).get("include_path") if is_record else doc.get("include_path")
            then = include_here(then, folders, cfg.include_path)
            calibrates = prepared.methods[name].needs_calibration
            plan = doc.get("plan")  # the KV policy it names: its plug-in code is compared too
            why = [f"{x} changed" for x in (differences(then, now, calibrates, name, plan) if isinstance(then, dict) else [])]
            why += stale_results(doc, is_record, cfg, prepared.task_options, prefix) if doc else []
            if why:
                found.append(f"{path.name} ({'; '.join(why)})")
    if found:
        raise UsageError(f"{out_dir} holds work made from other inputs than this run's: {', '.join(found)}; "
                         "use another --out, or remove those files to redo them")
