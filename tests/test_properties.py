"""Property-based tests of the loaders of user input: generated `--set` items, spec files and record JSON
give either a valid object or a `UsageError` with a message, never another exception (issue 14)."""

from __future__ import annotations

import dataclasses
import json
import math

from conftest import ROOT
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness.errors import UsageError

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# -- --set SCOPE.OPTION=VALUE -------------------------------------------------------------------------
METHODS = ("shortgpt", "pdtrim", "streamline", "manual", "snapkv")
TASKS = ("passkey", "pd_ppl")


def _pairs() -> list[tuple[str, str]]:
    """Every real (scope, option) of the scopes above: most generated items hit a real option."""
    import methods
    from harness.quality import long_tasks
    from harness.quality.calibration import CalibConfig

    configs = {**{m: methods.get(m).Config for m in METHODS}, **{t: long_tasks.get(t).Config for t in TASKS},
               "calib": CalibConfig}
    return [(scope, f.name) for scope, c in configs.items() for f in dataclasses.fields(c)]


def _options() -> list[str]:
    return sorted({name for _, name in _pairs()})


NUMBERS = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["nan", "inf", "-inf", "NaN", "1e400", "-0", "0x10", "1_000", "9" * 5000, "", " "]))
VALUES = st.one_of(NUMBERS, NUMBERS, st.lists(NUMBERS, max_size=4).map(",".join), st.text(max_size=12),
                   st.sampled_from(["true", "off", "none", "piqa", "mmlu,piqa", "ffn", "snapkv"]))
SCOPED = st.one_of(st.sampled_from(_pairs()), st.sampled_from(_pairs()), st.tuples(st.sampled_from([*METHODS, *TASKS, "calib", "nope"]),
                                                        st.sampled_from(_options() + ["zz"])))
ITEMS = st.builds(lambda pair, value, form: form.format(s=pair[0], n=pair[1], v=value), SCOPED, VALUES,
                  st.sampled_from(["{s}.{n}={v}"] * 4 + ["{s}.{n}{v}", "{s}{n}={v}", "{s}.={v}", " {s} . {n} = {v}"]))


@FAST
@given(items=st.lists(ITEMS, min_size=1, max_size=2))
@example(items=["pdtrim.d_t=nan"])  # the two cases, always tried
@example(items=["pdtrim.heal_lr=inf", "calib.n_samples=4"])
def test_set_items_give_options_or_a_usage_error(items, data_dir):
    from harness.config import RunConfig
    from harness.run.pipeline import prepare

    cfg = RunConfig(model="random:tiny", methods=METHODS, tasks=("arc_easy", *TASKS), overrides=tuple(items),
                    data_dir=str(data_dir))
    try:
        prepared = prepare(cfg)
    except UsageError as e:
        assert str(e).strip()
        return
    for options in [m.config for m in prepared.methods.values()] + [*prepared.task_options.values(), prepared.calib_config]:
        for f in dataclasses.fields(options):  # what was accepted is usable: no NaN / inf slipped through
            value = getattr(options, f.name)
            for x in value if isinstance(value, tuple) else (value,):
                assert not isinstance(x, float) or math.isfinite(x), (f.name, items)


# -- spec files ----------------------------------------------------------------------------------------
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)  # strings, integers, finite floats: JSON spelling is TOML spelling


SPEC_KEYS = ["methods", "tasks", "limit", "set", "out", "mode", "seed", "model", "quiet", "plans_from", "plans-from",
             "prompt_tokens", "bandwidth", "results", "no_plots", "config", "help", "metods", "overrides"]
SCALARS = st.one_of(st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=10), st.sampled_from(["unpruned", "arc_easy", "run", "both", "nan"]))
SPEC_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=4), inner, max_size=2)),
                           max_leaves=6)
SECTIONS = st.dictionaries(st.sampled_from(["run", "latency", "report", "sweep"]),
                           st.dictionaries(st.sampled_from(SPEC_KEYS), SPEC_VALUES, max_size=5), max_size=3)


@FAST
@given(sections=SECTIONS, garbage=st.one_of(st.none(), st.text(max_size=40)))
def test_spec_files_give_arguments_or_a_usage_error(sections, garbage, tmp_path):
    from harness.cli.latency import latency_parser
    from harness.cli.report import report_parser
    from harness.cli.run import run_parser
    from harness.cli.spec import load_spec, to_argv

    text = garbage if garbage is not None else "".join(
        f"[{name}]\n" + "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in body.items())
        for name, body in sections.items())
    path = tmp_path / "spec.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    parsers = {"run": run_parser, "latency": latency_parser, "report": report_parser}
    try:
        spec = load_spec(path)
        for name in spec.sections:
            argv = to_argv(spec, name, parsers[name]())
            assert all(isinstance(a, str) for a in argv)
    except UsageError as e:
        assert str(e).strip()


# -- record JSON ---------------------------------------------------------------------------------------
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=8)
REFERENCE = sorted((ROOT / "results" / "reference").rglob("*__*.json"))


def _mutations():
    """A reference record with fields replaced, dropped or nested values swapped for generated JSON."""
    base = json.loads(REFERENCE[0].read_text())
    paths = [(k,) for k in base] + [("scores", t) for t in base["scores"]] + [("kv", t) for t in base["kv"]] + \
            [("scores", t, m) for t, ms in base["scores"].items() for m in ms] + [("plan", "decode_layers"), ("config", "model")]

    def mutate(path, value, drop):
        d = json.loads(json.dumps(base))
        node = d
        for key in path[:-1]:
            node = node[key]
        if drop:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
        return d

    return st.builds(mutate, st.sampled_from(paths), JSON, st.booleans())


@FAST
@given(d=st.one_of(JSON, _mutations()))
def test_record_json_gives_a_record_or_a_usage_error(d, tmp_path):
    from harness.store.records import RunRecord, summary_rows
    from reports.collect import ReportError, collect
    from reports.render import build_tables

    try:
        r = RunRecord.from_dict(d, "gen.json")
    except UsageError as e:
        assert str(e).startswith("gen.json: ")
        return
    summary_rows([r])
    r.kv_bytes_total()
    folder = tmp_path / "recs"
    folder.mkdir(exist_ok=True)
    (folder / "m__disaggregated.json").write_text(json.dumps(d))
    try:
        build_tables(collect([folder]))  # a record the loader accepts renders, or is refused with a message
    except ReportError as e:
        assert str(e).strip()

