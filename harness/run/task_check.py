"""The lm-eval tasks of a run whose rows come from local data, built before the model loads.

A task's rows come from a loader (an lm-eval task on local data under --data-dir, `LocalTask.load`) or from the data
an `--include-path` YAML names; lm-eval renders the first one while building the task, and a row lacking a field a
template reads failed there, once the model had loaded (and each cell had planned) and once per cell. Building these
tasks first costs what the first cell's building would have (the same `TaskCache` serves the cells) and refuses such
rows in seconds, naming the task, its YAML and its loader (exit 2).
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import PluginFailed, UsageError
from harness.quality.evaluate import TaskCache
from harness.store import records as rec


def rows_from_local_data(cfg, tasks: TaskCache) -> list[str]:
    """The run's lm-eval tasks whose rows come from local data: its local tasks under --data-dir (their loaders) and
    the tasks its --include-path YAMLs define (`tasks.defined()`; not lm-eval's hub tasks, which this would download,
    nor long-context tasks, which lm-eval does not build)."""
    from harness.quality import local_tasks, long_tasks

    own = tasks.defined()
    return [t for t in cfg.tasks if not long_tasks.is_long_task(t)
            and (t in own or (cfg.data_dir is not None and local_tasks.is_local_task(t)))]


def pending(cfg, prepared, out_dir: Path) -> bool:
    """Whether a cell of the run has no finished record in `out_dir` yet (else no task is evaluated: none is built)."""
    return any(not (out_dir / rec.record_filename(n, m)).exists() for n in prepared.methods for m in cfg.modes)


def tasks_before_load(cfg, prepared, out_dir: Path) -> TaskCache:
    """The run's `TaskCache`, with `rows_from_local_data`'s tasks built and their first rows rendered now
    (`TaskCache.check_rows`) when a cell is `pending`: a UsageError (exit 2) for a row that lacks a field a template
    reads, or a loader's own; `PluginFailed` (exit 1) for a plug-in loader that raised. Any other error building a task
    is left to the cell that builds it, as before (a hub download, lm-eval's own errors). The caller closes it (its
    cells use it)."""
    tasks = TaskCache(cfg.tasks, Path(cfg.data_dir) if cfg.data_dir else None, cfg.include_path)
    try:
        for task in rows_from_local_data(cfg, tasks) if pending(cfg, prepared, out_dir) else ():
            try:
                tasks.check_rows([task], cfg.num_fewshot)
            except UsageError:
                raise
            except Exception as e:  # noqa: BLE001 - the cell reports the others, as it did before this check
                _stop_on_loader_failure(task, e)
    except BaseException:
        tasks.close()
        raise
    return tasks


def _stop_on_loader_failure(task: str, error: Exception) -> None:
    """`PluginFailed` (exit 1, one line) when plug-in code, a task's loader, raised `error` while its task was built:
    its own failure, as a plug-in task's `evaluate()` that raises, but said once and before the model loads, where it
    failed every cell after the loading, naming nothing (the same rows each time: no cell could pass). Another error
    (a hub download, lm-eval's own) is left to the cell that builds the task, as before."""
    from harness.run.plugin_faults import blame, one_line, plugin_line

    where = blame(error)
    if where is not None:
        raise PluginFailed(f"task {task}: its loader failed: {type(error).__name__}: {one_line(error)} (in plug-in "
                           f"{where}, {plugin_line(error)}); nothing was run: fix the loader or the data it reads, then "
                           "rerun") from error


def options_against_tokenizer(cfg, prepared, loaded=None, warn: bool = True):
    """Refuse (UsageError, exit 2) the options the model's tokenizer or context length rule out, before any cell: an
    --apply_chat_template NAME it lacks, a long-context prompt longer than the context (`long_tasks.check_before_cells`).
    With `loaded` None, checked against the tokenizer and config alone (`models.tokenizer_and_config`), before the
    weights load: a passkey length that did not fit was refused after an 8B model's minutes of loading. Returns the
    tokenizer checked against (None: nothing to check, none loaded). `warn=False`: without `warn_chat_template_unused`'s
    warning, for a check before the one `pipeline.run` makes again (a warning shown twice)."""
    from harness.pd.models import tokenizer_and_config

    if not _needs_tokenizer(cfg):
        return None  # nothing to check: no tokenizer loaded twice
    tokenizer, config = (loaded.tokenizer, loaded.model.config) if loaded is not None \
        else tokenizer_and_config(cfg.model, cfg.model_arg_dict())
    _check_options(cfg, prepared, tokenizer, config, warn)
    return tokenizer


def before_load(cfg, prepared, warn: bool = True):
    """`options_against_tokenizer` and `refuse_before_load` for a run's model, methods and modes, on one read of the
    model's files before its weights load: its config, with its tokenizer when an option needs it (each check read
    the config itself: twice, and for a hub id twice the probe of the hub). Returns the tokenizer checked against
    (None: no option needed it)."""
    from harness.pd.models import model_config, tokenizer_and_config

    spec, model_args = cfg.model, cfg.model_arg_dict()
    tokenizer, config = tokenizer_and_config(spec, model_args) if _needs_tokenizer(cfg) \
        else (None, model_config(spec, model_args))
    if tokenizer is not None:
        _check_options(cfg, prepared, tokenizer, config, warn)
    refuse_before_load(spec, model_args, prepared.methods, cfg.modes, config)
    return tokenizer


def _needs_tokenizer(cfg) -> bool:
    """Whether an option is checked against the tokenizer: --apply_chat_template, or a long-context task."""
    from harness.quality import long_tasks

    return bool(cfg.apply_chat_template) or any(long_tasks.is_long_task(t) for t in cfg.tasks)


def _check_options(cfg, prepared, tokenizer, config, warn: bool) -> None:
    """`options_against_tokenizer`'s checks against `tokenizer` and the model's `config` (its context length)."""
    from harness.quality import long_tasks

    check_chat_template(cfg, tokenizer)
    if warn:
        warn_chat_template_unused(cfg)
    long_tasks.check_before_cells(cfg.tasks, tokenizer, prepared.task_options, cfg.limit, cfg.max_length, config)


def model_before_load(spec: str, model_args: dict | None, methods: dict | None = None,
                      modes: tuple[str, ...] = ("disaggregated",), config=None) -> int | None:
    """The depth the config of the model `spec` names (None: a config without `num_hidden_layers`), once the config
    is checked for what it alone rules out (`arch.check_supported_config`: a Gemma-2's sliding windows), and by
    `methods` in `modes` (`methods.base.refuse_unfit`: SnapKV on DeepSeek-V3's latent KV cache): before the weights
    load (an 8B model's minutes), which checked it only after. `config`: that config, when the caller read it already
    (`models.model_config` reads it otherwise)."""
    from harness.pd.arch import check_supported_config
    from harness.pd.models import model_config
    from methods.base import refuse_unfit

    if config is None:
        config = model_config(spec, model_args)
    config = config.get_text_config()  # a multimodal config's text model: the decoder run
    check_supported_config(config, spec)
    refuse_unfit(methods or {}, config, modes)
    depth = getattr(config, "num_hidden_layers", None)
    return depth if isinstance(depth, int) else None


def refuse_before_load(spec: str, model_args: dict | None, methods: dict, modes: tuple[str, ...], config=None) -> None:
    """`model_before_load` (on `config` when given), and every method's counts against the depth it names
    (`methods.base.refuse_too_deep`): `--set tail.k=40` on a 32-layer 8B model was refused only after the weights'
    minutes of loading. A config without a depth leaves the counts to the check against the loaded model."""
    from methods.base import refuse_too_deep

    if (depth := model_before_load(spec, model_args, methods, modes, config)) is not None:
        refuse_too_deep(methods, depth, modes)


def warn_chat_template_unused(cfg) -> None:
    """A `HarnessWarning` when --apply_chat_template comes with long-context tasks: they build their prompts as raw
    token lists (no chat template), so the flag does not reach them, while their records' config
    said `apply_chat_template: true` and their run key differed from a run without it, for the same numbers."""
    import warnings

    from harness.errors import HarnessWarning
    from harness.quality import distributed, long_tasks

    long_here = [t for t in cfg.tasks if long_tasks.is_long_task(t)]
    if cfg.apply_chat_template and long_here and distributed.current().is_main:  # one voice under data parallelism
        warnings.warn(f"--apply_chat_template does not apply to the long-context tasks {', '.join(long_here)}: their "
                      "prompts are token lists (no chat template); it applies to the lm-eval tasks "
                      "only", HarnessWarning, stacklevel=2)


def check_chat_template(cfg, tokenizer) -> None:
    """--apply_chat_template NAME must name one of the tokenizer's templates: with one template lm-eval only warns
    and uses it (the name selecting nothing but the run key), with several an unknown name is its ValueError."""
    template = getattr(tokenizer, "chat_template", None)
    if cfg.apply_chat_template and not template:
        raise UsageError(f"--apply_chat_template: the tokenizer of {cfg.model} has no chat template; leave the flag off")
    name = cfg.apply_chat_template if isinstance(cfg.apply_chat_template, str) else None
    if name and not isinstance(template, dict):
        raise UsageError(f"--apply_chat_template {name}: the tokenizer of {cfg.model} has one chat template, not named "
                         "ones, so the name would select nothing; give --apply_chat_template without a name")
    if name and name not in template:
        raise UsageError(f"--apply_chat_template {name}: no such template in the tokenizer of {cfg.model}; its templates: "
                         f"{', '.join(sorted(template))}")
