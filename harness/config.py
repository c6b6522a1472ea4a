"""Run configuration and `--set scope.field=value` overrides, typed against each scope's dataclass."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from harness.errors import UsageError
from harness.quality import long_tasks
from harness.store.task_names import STANDARD_TASKS

# --dtype's spellings -> the full name records store (`harness.cli.flags.dtype_arg`; earlier versions stored them as typed)
DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}

# harness-native long-context workloads: the plug-ins of harness/quality/long_tasks/ (built-in ones first), as
# registered when this module is imported; the `long` alias, --tasks and --set ask the registry itself, so a task
# registered later (a HARNESS_PLUGINS module, loaded with the methods) is in `long` too
LONG_TASKS = long_tasks.names()
DEFAULT_TASKS = STANDARD_TASKS + LONG_TASKS
DEFAULT_METHODS = ("unpruned", "shortgpt")
DEFAULT_LIMIT = 100
# RunConfig fields added later -> their default, at which they are left out of run keys and ids (and include_path out
# of records), so runs that do not use them keep the keys they had
LATER_DEFAULTS = {"num_fewshot": 0, "apply_chat_template": False, "model_args": None, "include_path": None}


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a quality run's results (recorded with every record)."""

    model: str = "smollm2-135m"
    methods: tuple[str, ...] = DEFAULT_METHODS
    tasks: tuple[str, ...] = DEFAULT_TASKS
    # lm-eval per-task cap (per subtask for groups): a count, or a fraction (0 < x < 1) of each task's items
    # (lm-eval's rule, ceil(n * x)); None = full split
    limit: int | float | None = DEFAULT_LIMIT
    modes: tuple[str, ...] = ("unified", "disaggregated")
    seed: int = 0
    batch_size: int | str = 16  # requests per forward, or "auto" / "auto:N" (the size found is in each record)
    device: str = "auto"
    dtype: str = "auto"
    data_dir: str | None = None
    max_length: int | None = None  # None: the model's context length, as lm-eval's HFLM resolves it
    bootstrap_iters: int = 1000  # lm-eval's bootstrap for stderrs of non-mean metrics; 0: lm-eval reports no stderr
    num_fewshot: int = 0  # lm-eval few-shot examples per item (sampled with fewshot_random_seed = seed)
    plans_from: str | None = None  # reuse plans stored in these records when method, options and calibration match
    apply_chat_template: bool | str = False  # lm-eval's: wrap prompts in the tokenizer's (or this named) chat template
    model_args: str | None = None  # "key=value,..." from_pretrained options (harness.pd.models.MODEL_ARGS), sorted
    overrides: tuple[str, ...] = ()  # raw --set items, scoped "method.field=value", "calib.field=value" or "task.field=value"
    # accelerate big-model placement (--device-map auto): where weights live, not what is computed
    device_map: str | None = None
    max_memory: str | None = None  # "0=20GiB,cpu=64GiB"
    offload_folder: str | None = None
    # folders of lm-eval task YAMLs of the user's own (--include-path; absolute, in the order given); None: none
    include_path: tuple[str, ...] | None = None

    PLACEMENT = ("device_map", "max_memory", "offload_folder")
    # not in a cell's run key: the cells run beside it, and placement (a split model computes the same results,
    # tests/test_placement.py)
    KEY_SKIP = ("methods", "modes", "overrides", "plans_from", *PLACEMENT)

    def placement(self):
        from harness.pd.models import Placement

        return Placement.parse(self.device_map, self.max_memory, self.offload_folder)

    def model_arg_dict(self) -> dict[str, Any]:
        """`model_args` parsed for `load_model` ({} when unset)."""
        from harness.pd.models import parse_model_args

        return parse_model_args(self.model_args)

    def identity(self, method: str, mode: str, method_options: dict, calib: dict | None, task_options: dict | None = None) -> str:
        """Content hash of what determines one (method, mode) record."""
        canon = {k: v for k, v in self._canonical().items() if k not in self.KEY_SKIP}
        canon.update(method=method, mode=mode, method_options=method_options, calib=calib)
        if task_options:  # only runs with long-context tasks carry it (keeps older keys stable)
            canon["task_options"] = task_options
        return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _canonical(self) -> dict[str, Any]:
        """The fields that name a run; fields added later with their default left out, so the keys
        of runs that do not use them stay what they were."""
        d = dataclasses.asdict(self)
        for name, default in LATER_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    def run_id(self, with_paths: bool = False, include_paths: bool = False) -> str:
        """The id in a default output folder's name: the data folder and the --include-path folders count by kind
        (and number), not path, so a moved checkout, data folder or include folder finds its folder again (their
        files are compared by digest there); `with_paths`: the id versions before this one gave, which hashed the
        paths; `include_paths`: the one they gave while only the data folder counted by kind."""
        canon = self._canonical()
        if canon.get("data_dir") and not with_paths:
            canon["data_dir"] = "local folder"
        if canon.get("include_path") and not (with_paths or include_paths):
            canon["include_path"] = ["local folder"] * len(canon["include_path"])
        return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def recorded(self) -> dict[str, Any]:
        """The fields a record's `config` keeps: all of them, less `include_path` when unset (records made before
        it existed, and runs without it, have the same shape)."""
        d = dataclasses.asdict(self)
        if d["include_path"] is None:
            del d["include_path"]
        return d


def coerce(raw: str, hint: Any, where: str, nonfinite: bool = False) -> Any:
    """Parse `raw` as the dataclass field type `hint` (int, float, bool, str, tuple[int, ...], Optional).

    NaN and ±inf are refused for floats (they pass every `<`/`>` range check the wrong way) unless
    `nonfinite`: an option that means them documents so with `field(metadata={"nonfinite": True})`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        return coerce(raw, args[0], where, nonfinite)
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        parts = [p for p in raw.replace(";", ",").split(",") if p.strip()] if raw.strip() else []
        return tuple(coerce(p.strip(), inner, where, nonfinite) for p in parts)
    if hint is float and not nonfinite:
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"--set {where}={raw}: expected {_EXPECTED[float]}, got {raw!r}") from None
        if not math.isfinite(value):
            raise UsageError(f"--set {where}={raw}: expected a finite number")
        return value
    try:
        if hint is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint in (int, float, str):
            return hint(raw)
    except ValueError:
        what = _EXPECTED.get(hint, getattr(hint, "__name__", hint))
        raise UsageError(f"--set {where}={raw}: expected {what}, got {raw!r}") from None
    raise UsageError(f"--set {where}: unsupported option type {hint}")


_EXPECTED = {int: "int (a whole number)", float: "float (a number, e.g. 0.5)", bool: "bool (true or false)"}


def expand_tasks(tasks: typing.Iterable[str]) -> tuple[str, ...]:
    """Replace the aliases `standard` and `long` (every registered long-context task, plug-ins included) by
    their tasks; keep order, drop repeats."""
    aliases = {"standard": STANDARD_TASKS, "long": long_tasks.names()}
    out: list[str] = []
    for t in tasks:
        for name in aliases.get(t, (t,)):
            if name not in out:
                out.append(name)
    return tuple(out)


def split_overrides(items: typing.Iterable[str], scopes: typing.Iterable[str]) -> dict[str, dict[str, str]]:
    """['shortgpt.k=8', 'calib.seed=1'] -> {'shortgpt': {'k': '8'}, 'calib': {'seed': '1'}}; checks syntax and scopes."""
    scopes = list(scopes)
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        scope, dot, name = key.strip().partition(".")
        if not eq or not dot or not name:
            raise UsageError(f"--set {item!r}: expected SCOPE.OPTION=VALUE, e.g. --set shortgpt.k=8")
        if scope not in scopes:
            raise UsageError(f"--set {item!r}: {scope!r} is not a method or long-context task of this run nor 'calib'; "
                             f"scopes here: {', '.join(scopes)}")
        given = out.setdefault(scope, {})
        if given.get(name, raw.strip()) != raw.strip():  # the last one silently won
            raise UsageError(f"--set {scope}.{name} is given twice ({given[name]!r} and {raw.strip()!r}); give it once "
                             f"(a scalar option of a method sweeps values given in one --set: {scope}.{name}="
                             f"{given[name]},{raw.strip()}; a task's options do not sweep)")
        given[name] = raw.strip()
    return out


SWEEP_MARK = "@"  # a swept variant's name: METHOD@OPTION=VALUE[,OPTION=VALUE]


def expand_sweeps(cls_config: type, scope: str, raw: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """A scope's `--set` values with sweeps expanded: a comma-separated value of a scalar option
    (`shortgpt.k=2,4,6`) is one variant per value, and several swept options give their product, in
    order. Returns [(variant name, raw options)]: [(scope, raw)] when nothing is swept, else
    `shortgpt@k=2`, ... (tuple-typed options take comma-separated values as one value, as before, and so
    does a value holding NAME=VALUE items, such as `snapkv.base_options=decode_layers=0,1 n_first=4`)."""
    hints = typing.get_type_hints(cls_config)
    swept = {}
    for name, value in raw.items():
        hint = hints.get(name)
        scalar = hint is not None and typing.get_origin(hint) is not tuple and not (
            typing.get_origin(hint) in (typing.Union, types.UnionType)
            and any(typing.get_origin(a) is tuple for a in typing.get_args(hint)))
        if scalar and "," in value and "=" not in value:  # NAME=VALUE items (a KV baseline's base_options) are one value
            values = [v.strip() for v in value.split(",")]
            if len(values) != len(set(values)) or not all(values):  # `k=1,` is a typo, not a sweep of one value
                raise UsageError(f"--set {scope}.{name}={value}: a sweep needs distinct values, none empty, e.g. {scope}.{name}=2,4,6")
            _refuse_equal_values(cls_config, scope, name, values)
            swept[name] = values
    if not swept:
        return [(scope, raw)]
    out = []
    for combo in itertools.product(*swept.values()):
        chosen = dict(zip(swept, combo))
        tag = ",".join(f"{k}={v}" for k, v in chosen.items())
        out.append((f"{scope}{SWEEP_MARK}{tag}", {**raw, **chosen}))
    return out


def _refuse_equal_values(cls_config: type, scope: str, name: str, values: list[str]) -> None:
    """A UsageError for two values of a sweep that are one value typed two ways (`k=02,2`, `ratio=0.5,.5`): each made a
    cell of its own, with the same plan under two names (a PDTrim search of minutes, run twice). A value that does not
    convert is left to `build_options`, which names it."""
    field = next(f for f in dataclasses.fields(cls_config) if f.name == name)
    hint = typing.get_type_hints(cls_config)[name]
    seen: dict[Any, str] = {}
    for v in values:
        try:
            key = repr(coerce(v, hint, f"{scope}.{name}", field.metadata.get("nonfinite", False)))
        except UsageError:
            continue
        if key in seen:
            raise UsageError(f"--set {scope}.{name}={','.join(values)}: {seen[key]} and {v} are the same value, which would "
                             "be measured twice under two names; give each value once")
        seen[key] = v


def sweep_base(name: str) -> str:
    """The method of a swept variant (`shortgpt@k=2` -> `shortgpt`); other names unchanged."""
    return name.split(SWEEP_MARK, 1)[0]


def did_you_mean(word: str, known: typing.Iterable[str], cutoff: float = 0.7) -> str:
    """' (did you mean batch_size?)' when one of `known` is close to `word` (difflib's ratio >= `cutoff`), else ''."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]}?)" if close else ""


def build_options(cls_config: type, scope: str, raw: dict[str, str]) -> Any:
    """Instantiate the frozen options dataclass `cls_config` with `raw` string overrides."""
    hints = typing.get_type_hints(cls_config)
    fields = {f.name: f for f in dataclasses.fields(cls_config)}
    known = list(fields)
    changes = {}
    for name, value in raw.items():
        if name not in known:
            raise UsageError(f"--set {scope}.{name}: {scope} has no option {name!r}{did_you_mean(name, known)}; "
                             f"options: {', '.join(known) or 'none'}")
        changes[name] = coerce(value, hints[name], f"{scope}.{name}", fields[name].metadata.get("nonfinite", False))
    try:
        return cls_config(**changes)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--set {scope}: {e}") from e


def options_help(cls_config: type) -> str:
    """'k=8 (int), batch_size=16 (int)' for --help texts."""
    hints = typing.get_type_hints(cls_config)
    parts = []
    for f in dataclasses.fields(cls_config):
        default = f.default if f.default is not dataclasses.MISSING else "?"
        parts.append(f"{f.name}={default} ({getattr(hints[f.name], '__name__', str(hints[f.name]))})")
    return ", ".join(parts) or "no options"
