"""Every registered method honours the contract; ShortGPT matches an independent Block Influence."""

import dataclasses
import re

import pytest
import torch
from method_contract import check_method_contract

import methods
from harness.errors import UsageError
from harness.pd import arch
from harness.quality.calibration import CalibConfig, build_calibration

# Options that exercise a non-default path on the tiny model, on top of `Config.for_layers(4)`
# (which every method has, so a new method needs no entry here).
EXERCISE = {
    "manual": {"prefill_layers": (0, 1, 3), "decode_layers": (0, 3)},
    "pdtrim": {"tau": 0.0},  # every decode layer selected: the KV policy is exercised
    "streamline": {"replace": "ffn", "replace_steps": 20},  # covers installing and undoing the trained FFN
    # KV baselines over a manual plan whose first/last policy sets their byte budget
    "streamingllm": {"base": "manual", "base_options": "prefill_layers=0,1,3 decode_layers=0,3 kv_layers=3 n_first=1 n_last=2"},
    "snapkv": {"base": "manual", "base_options": "prefill_layers=0,1,3 decode_layers=0,3 kv_layers=3 n_first=1 n_last=2",
               "window": 2, "kernel": 3},
}
for _name in methods.names():  # every other KV baseline (one per registered token-selection policy): the same base
    if _name not in EXERCISE and getattr(methods.get(_name), "policy_cls", None) is not None:
        EXERCISE[_name] = {"base": EXERCISE["streamingllm"]["base"], "base_options": EXERCISE["streamingllm"]["base_options"]}


@pytest.fixture(scope="module")
def tiny_calib(tiny, data_dir):
    return build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=24, max_tokens=96, seed=0))


@pytest.mark.parametrize("name", methods.names())
def test_method_contract(name, tiny, tiny_calib):
    check_method_contract(name, tiny.model, tiny_calib, EXERCISE.get(name))


def test_registry_errors_name_the_known_methods():
    names = methods.names()
    plain = [n for n in names if not n.startswith("stage:")]
    assert {"manual", "pdtrim", "shortgpt", "unpruned", "sleb", "shortened_ppl", "shortened_taylor", "streamline", "tail",
            "random"} <= set(plain) and plain == sorted(plain)
    staged = ", ".join(n for n in names if n.startswith("stage:"))
    with pytest.raises(UsageError, match=re.escape(f"(did you mean 'shortgpt'?); known methods: {', '.join(plain)}; "
                                                   f"stage-aware variants: {staged} (a plug-in's method: name its module "
                                                   "in HARNESS_PLUGINS or a spec's top-level plugins key)")):
        methods.get("shortgtp")


def test_exercised_options_name_registered_methods():
    """EXERCISE keys are method names (a typo would silently skip the path it means to cover)."""
    assert set(EXERCISE) - set(methods.names()) == set()
    assert {"sleb", "shortened_ppl", "shortened_taylor", "streamline", "tail", "random", "stage:sleb"} <= set(methods.names())


@pytest.mark.parametrize("name", methods.names())
def test_for_layers_fits_small_models_and_keeps_the_defaults_for_real_ones(name):
    """`config_for_layers(4)` is a valid configuration (the contract test runs it on the 4-layer model);
    from 32 layers on it is the Config's defaults, so `for_layers` only shrinks what cannot fit."""
    cls = methods.get(name)
    cls(cls.config_for_layers(4))
    assert cls.config_for_layers(64) == cls.config_for_layers(32) == cls.Config()


def independent_block_cosines(model, calib):
    """Mean cos(h_in, h_out) per block from output_hidden_states, one sample at a time (no padding)."""
    dec = arch.decoder(model)
    n = arch.n_layers(model)
    sums, count = torch.zeros(n, dtype=torch.float64), 0
    with torch.inference_mode():
        for row in calib.input_ids:
            ids = torch.tensor([row])
            hs = dec(ids, output_hidden_states=True, use_cache=False).hidden_states  # last entry is post-norm
            pos = torch.arange(len(row))[None]
            last_out = dec.layers[n - 1](hs[n - 1], attention_mask=None,
                                         position_embeddings=dec.rotary_emb(hs[n - 1], pos), position_ids=pos)
            last_out = last_out[0] if isinstance(last_out, tuple) else last_out
            outs = [*hs[1:n], last_out]
            for i in range(n):
                sums[i] += torch.nn.functional.cosine_similarity(hs[i][0].double(), outs[i][0].double(), dim=-1).sum()
            count += len(row)
    return (sums / count).tolist()


def test_shortgpt_matches_independent_block_influence(tiny, tiny_calib):
    from methods.depth.blocks import block_cosines

    ours = block_cosines(tiny.model, tiny_calib, batch_size=5)
    ref = independent_block_cosines(tiny.model, tiny_calib)
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-5
    for k in (1, 2, 3):
        plan = methods.get("shortgpt")(methods.get("shortgpt").Config(k=k)).plan(tiny.model, tiny_calib, "disaggregated")
        bi = [1 - c for c in ref]
        expect = sorted(sorted(range(4), key=lambda i: bi[i])[:k])
        assert list(plan.removed_decode) == expect == list(plan.removed_prefill)
        assert plan.info["removed"] == expect


def test_shortgpt_rejects_k_not_below_layer_count(tiny, tiny_calib):
    cls = methods.get("shortgpt")
    with pytest.raises(UsageError, match=r"shortgpt.k=4: must be < the model's 4 layers"):
        cls(cls.Config(k=4)).plan(tiny.model, tiny_calib, "disaggregated")
    with pytest.raises(UsageError, match=r"shortgpt.k=-1"):
        cls(cls.Config(k=-1))


@pytest.mark.parametrize("name", ["shortgpt", "sleb", "random", "streamline", "pdtrim", "stage:shortgpt"])
def test_a_depth_too_deep_for_the_model_names_the_counts_that_fit(name, tiny, tiny_calib):
    """The defaults are sized for real models (k = 8), so every cell on random:tiny failed with nothing to try.
    The hint's --set values are the method's for_layers(4) depth counts, and they plan."""
    cls = methods.get(name)
    with pytest.raises(UsageError, match=r"must be < the model's 4 layers .*; for 4 layers try --set ") as err:
        cls().plan(tiny.model, tiny_calib, "disaggregated")
    given = dict(re.findall(rf"--set {re.escape(name)}\.(\w+)=(\d+)", str(err.value)))
    fit = cls.config_for_layers(4)
    assert given and all(getattr(fit, k) == int(v) for k, v in given.items())
    fixed = cls(dataclasses.replace(cls.Config(), **{k: int(v) for k, v in given.items()}))
    assert fixed.plan(tiny.model, tiny_calib, "disaggregated").n_layers == 4


@pytest.mark.parametrize("mode", ["unified", "disaggregated"])
def test_a_kv_baseline_whose_base_is_too_deep_names_its_base_options(mode, tiny, tiny_calib):
    """h2o's base (pdtrim) is set through h2o.base_options: `--set pdtrim.k_decode=2` was refused ('pdtrim' is not a
    method of the run). The hint keeps the base options given and plans."""
    cls = methods.get("h2o")
    with pytest.raises(UsageError, match=r"for 4 layers try --set \"h2o\.base_options=") as err:
        cls(dataclasses.replace(cls.Config(), base_options="tau=0.0")).plan(tiny.model, tiny_calib, mode)
    assert "--set pdtrim." not in str(err.value)
    assert re.match(r"h2o's base pdtrim\.k_\w+=8: must be < the model's 4 layers", str(err.value))  # named pdtrim alone
    given = re.search(r'--set "h2o\.base_options=([^"]*)"', str(err.value)).group(1)
    assert given.startswith("tau=0.0 ") and "k_decode=2" in given
    fixed = cls(dataclasses.replace(cls.Config(), base_options=given))
    assert fixed.plan(tiny.model, tiny_calib, mode).n_layers == 4


def test_a_stage_variant_names_a_too_deep_count_before_its_eligible_blocks(tiny, tiny_calib):
    """k_prefill=3 < 4 layers was checked first: 'at most 0 of the model's 4 blocks can be removed' (keep_first=4),
    with no hint, though k_decode=5 is too deep and for_layers(4) fits both."""
    cls = methods.get("stage:shortened_ppl")
    with pytest.raises(UsageError, match=r"k_decode=5: must be < the model's 4 layers .*; for 4 layers try ") as err:
        cls(dataclasses.replace(cls.Config(), k_prefill=3, k_decode=5)).plan(tiny.model, tiny_calib, "disaggregated")
    given = {k: int(v) for k, v in re.findall(r"--set stage:shortened_ppl\.(\w+)=(\d+)", str(err.value))}
    assert given["keep_first"] == 1 and given["k_decode"] == 2
    fixed = cls(dataclasses.replace(cls.Config(), **given))
    assert fixed.plan(tiny.model, tiny_calib, "disaggregated").n_layers == 4


def test_a_stage_variant_with_prefill_ratio_names_k_decode_not_the_derived_k_prefill(tiny, tiny_calib):
    """With prefill_ratio=0.9, k_prefill = 7 is derived from the default k_decode = 8: the error named k_prefill=7 (an
    option the user never set) and its hint said --set ...k_prefill=1, which the ratio overrides. It names k_decode, and
    the hint plans with the ratio kept."""
    cls = methods.get("stage:shortgpt")
    ratio = dataclasses.replace(cls.Config(), prefill_ratio=0.9)
    with pytest.raises(UsageError, match=r"^stage:shortgpt\.k_decode=8: must be < the model's 4 layers .*; for 4 layers try ") as err:
        cls(ratio).plan(tiny.model, tiny_calib, "disaggregated")
    given = {k: int(v) for k, v in re.findall(r"--set stage:shortgpt\.(\w+)=(\d+)", str(err.value))}
    assert "k_prefill" not in given and given["k_decode"] == 2
    fixed = cls(dataclasses.replace(ratio, **given)).plan(tiny.model, tiny_calib, "disaggregated")
    assert fixed.n_layers == 4 and len(fixed.removed_decode) == 2 and len(fixed.removed_prefill) == 1


@pytest.mark.parametrize("name, option", [("shortgpt", "k"), ("pdtrim", "k_decode"), ("stage:shortgpt", "k_decode")])
def test_a_count_too_deep_where_the_default_fits_names_the_default(name, option, monkeypatch, tiny_calib):
    """k=30 on a 30-layer model: for_layers(30) keeps the default k=8, so no count was named and the error had no
    hint at all; the count that is too deep is named at the value that fits."""
    from harness.pd import models

    monkeypatch.setitem(models.PRESETS, "tiny20", {**models.PRESETS["tiny"], "num_hidden_layers": 20})
    model = models.load_model("random:tiny20", device="cpu", dtype="float32").model
    cls = methods.get(name)
    with pytest.raises(UsageError, match=rf"{name}\.{option}=20: .* 20 layers .*; for 20 layers try "
                                         rf"--set {name}\.{option}=8$"):
        cls(dataclasses.replace(cls.Config(), **{option: 20})).plan(model, tiny_calib, "disaggregated")


def test_a_method_without_for_layers_gets_no_hint_that_is_too_deep_itself():
    """A plug-in Config without for_layers keeps k=8 for any model: k=10 on 4 layers must not hint k=8."""
    from methods.base import Method

    @dataclasses.dataclass(frozen=True)
    class Plain:
        k: int = 8

    class NoFit(Method):
        name, Config = "pd_test_no_fit", Plain

        def plan(self, model, calib, mode):
            raise self.too_deep("k", self.config.k, 4)

        def apply(self, model, plan):
            raise NotImplementedError

    with pytest.raises(UsageError) as err:
        NoFit(Plain(k=10)).plan(None, None, "unified")
    assert str(err.value) == "pd_test_no_fit.k=10: must be < the model's 4 layers (at least one must stay)"


@pytest.mark.parametrize("name, options", [("shortgpt", {}), ("sleb", {}), ("streamline", {}), ("pdtrim", {}),
                                           ("stage:shortgpt", {}), ("stage:shortened_ppl", {"k_prefill": 2, "k_decode": 3}),
                                           ("h2o", {"base_options": "tau=0.0"})])
@pytest.mark.parametrize("mode", ["unified", "disaggregated"])
def test_check_depth_refuses_without_planning_what_plan_refuses(name, options, mode, tiny, tiny_calib, monkeypatch):
    """`check_depth(n, mode)` (what a latency run asks of every method before any plans) raises the very error `plan`
    raises for counts too deep for the model, and touches neither the model nor the calibration set."""
    cls = methods.get(name)
    method = cls(dataclasses.replace(cls.Config(), **options))
    with pytest.raises(UsageError) as planned:
        method.plan(tiny.model, tiny_calib, mode)
    with pytest.raises(UsageError) as checked:
        method.check_depth(4, mode)
    assert str(checked.value) == str(planned.value) and "the model's 4 " in str(checked.value)
    if "base_options" not in options:  # a KV baseline's for_layers does not fit its base's options
        cls(cls.config_for_layers(4)).check_depth(4, mode)  # counts that fit pass


def test_manual_plan_violating_subset_rule_is_a_usage_error(tiny):
    cls = methods.get("manual")
    with pytest.raises(UsageError, match="subset of prefill_layers"):
        cls(cls.Config(prefill_layers=(0, 1), decode_layers=(0, 2))).plan(tiny.model, None, "disaggregated")
