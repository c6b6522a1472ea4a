"""The method contract, as a function: the contract test runs it for every registered method, and
the plug-in test for a method defined in a temporary module (so a new method needs no test edit)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from conftest import random_requests

import methods
from harness.pd import arch
from harness.pd.plan import PruningPlan
from harness.quality.scoring import Scorer
from methods.depth import ranked


def make(name: str, n_layers: int, options: dict[str, Any] | None = None):
    """An instance of method `name` with options for an `n_layers` model (`Config.for_layers`),
    then `options` on top."""
    cls = methods.get(name)
    return cls(dataclasses.replace(cls.config_for_layers(n_layers), **(options or {})))


def block_numel(model) -> int:
    return sum(p.numel() for p in arch.decoder_layers(model)[0].parameters())


def check_method_contract(name: str, model, calib, options: dict[str, Any] | None = None) -> None:
    """Plans in both modes are valid (`decode ⊆ prefill`, unified plans unified), deterministic for a
    fresh instance, leave the model as it was; `apply` copies no weight, runs through the PD
    scorer with at most the dense KV bytes, and is fully undone."""
    n = arch.n_layers(model)
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        ref = model(ids).logits.clone()
    method = make(name, n, options)
    storage = {k: (p.data_ptr(), p.dtype, tuple(p.shape)) for k, p in model.named_parameters()}
    for mode in ("unified", "disaggregated"):
        plan = method.plan(model, calib, mode)
        assert isinstance(plan, PruningPlan) and plan.method == name and plan.n_layers == n
        ranked._SHARED.clear()  # the fresh instance must compute again, not reuse this process's ranking
        assert make(name, n, options).plan(model, calib, mode) == plan  # deterministic (fresh instance)
        assert set(plan.decode_layers) <= set(plan.prefill_layers)
        if mode == "unified":
            assert plan.is_unified
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, ref)  # planning left the model as it was
        check_apply(method, model, plan)
        check_keep_ignores_the_layer(plan)
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, ref)  # apply() fully undone
        assert {k: (p.data_ptr(), p.dtype, tuple(p.shape)) for k, p in model.named_parameters()} == storage


def check_apply(method, model, plan) -> None:
    """Inside `apply`: no weight is copied (every original parameter keeps its storage); only a method
    that installs a trained replacement, which is why it must re-plan on resume (streamline's FFN),
    adds parameters, and at most one block's worth; the PD scorer sends at most the dense KV bytes."""
    n = arch.n_layers(model)
    originals = {id(p): p.data_ptr() for p in model.parameters()}
    with method.apply(model, plan) as applied:
        for p in model.parameters():
            assert id(p) not in originals or p.data_ptr() == originals[id(p)]
        added = sum(p.numel() for p in model.parameters() if id(p) not in originals)
        assert added == 0 or (method.needs_replan_on_resume() and added <= block_numel(model))
        reqs = random_requests(5, 256, seed=11)
        s = Scorer(model, applied, "disaggregated", max_length=512)
        s.loglikelihood(reqs)
        dense = Scorer(model, PruningPlan.dense("u", n), "disaggregated", max_length=512)
        dense.loglikelihood(reqs)
        assert 0 < s.tally.kv_bytes <= dense.tally.kv_bytes


def check_keep_ignores_the_layer(plan: PruningPlan) -> None:
    """A head-shared KV policy that observes nothing is asked for a mask once per (positions, budgets): the handoff
    hands that mask to every later decode layer of the same budgets. So its `keep()` must not depend on `layer`, else
    those layers would silently send another layer's positions."""
    pol = plan.kv_policy
    if pol.keeps_all or pol.per_head or pol.observation() is not None or len(plan.decode_layers) < 2:
        return
    lengths, columns = torch.tensor([12, 7]), torch.arange(12)[None]
    positions = torch.where(columns < lengths[:, None], columns, -1)  # the shorter request padded at the end
    k = torch.tensor([5, 3])  # one budget for every layer: the case the handoff shares
    masks = {layer: pol.keep(layer, positions, lengths, k, None) for layer in plan.decode_layers}
    first = plan.decode_layers[0]
    for layer, mask in masks.items():
        assert torch.equal(mask, masks[first]), (f"{pol.kind}.keep() gave layer {layer} another mask than layer {first} "
                                                 "for the same positions, lengths and budget")


def base_options(base: str, n_layers: int) -> dict[str, Any]:
    """The base's options for an `n_layers` model (`Config.for_layers`), except `k` (the wrapper's counts replace it)."""
    return {f: v for f, v in dataclasses.asdict(methods.get(base).config_for_layers(n_layers)).items() if f != "k"}


def check_stage_wrapper_nests(base: str, model, calib) -> None:
    """`stage:<base>` removes prefixes of the base's removal order: k_prefill for prefill, k_decode for
    decode (so R_prefill ⊆ R_decode), k_unified in unified mode, where it equals the base at k = k_unified."""
    n = arch.n_layers(model)
    opts = base_options(base, n)
    order = make(base, n, opts).removal_order(model, calib, 2)
    for kp, kd in ((0, 2), (1, 2), (2, 2), (1, 1)):
        plan = make(f"stage:{base}", n, {"k_prefill": kp, "k_decode": kd, **opts}).plan(model, calib, "disaggregated")
        assert len(plan.removed_prefill) == kp and len(plan.removed_decode) == kd
        assert set(plan.removed_prefill) <= set(plan.removed_decode)
        assert list(plan.removed_prefill) == sorted(order[:kp]) and list(plan.removed_decode) == sorted(order[:kd])
        assert plan.kv_policy.keeps_all and plan.method == f"stage:{base}"
    unified = make(f"stage:{base}", n, {"k_unified": 2, **opts}).plan(model, calib, "unified")
    assert unified.is_unified
    assert unified.removed_decode == make(base, n, {"k": 2, **opts}).plan(model, calib, "unified").removed_decode
