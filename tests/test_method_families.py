"""Every registered method on families other than Llama: fused projections (Phi-3), mixture-of-experts blocks
(Mixtral), multi-head latent attention with dense and MoE layers mixed (DeepSeek-V3). The load check accepts them
after comparing the engine's dense scores with their own forward (tests/test_models.py); this runs the methods'
own code on them (block statistics, gradients, trained replacements, the attention probe, healing)."""

from __future__ import annotations

import functools

import pytest
from method_contract import check_method_contract
from test_methods import EXERCISE
from test_models import tiny_family

import methods
from harness.errors import UsageError
from harness.pd import arch

FAMILIES = ("phi3", "mixtral", "deepseek_v3")


@functools.cache
def model_of(family: str):
    return tiny_family(family)


@pytest.fixture(scope="module")
def calib(data_dir):
    from harness.pd.presets import byte_tokenizer
    from harness.quality.calibration import CalibConfig, build_calibration

    return build_calibration(byte_tokenizer(300), data_dir, CalibConfig(n_samples=12, max_tokens=64, seed=0))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", methods.names())
def test_every_method_keeps_its_contract_on_other_families(name, family, calib):
    """Plans in both modes, applied and scored by the engine; a KV policy that selects per KV head is refused on a
    latent KV cache (DeepSeek-V3 has no KV heads), naming the model type."""
    model = model_of(family)
    policy_cls = getattr(methods.get(name), "policy_cls", None)
    if arch.latent_kv(model.config) and policy_cls is not None and policy_cls.per_head.fget(None):
        with pytest.raises(UsageError, match=rf"{family} model caches one compressed latent per token"):
            check_method_contract(name, model, calib, EXERCISE.get(name))
        return
    check_method_contract(name, model, calib, EXERCISE.get(name))
