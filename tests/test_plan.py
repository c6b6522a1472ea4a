import pytest

from harness.pd.plan import KVPolicy, PlanError, PruningPlan


def test_valid_plan_roundtrips_through_dict():
    plan = PruningPlan("x", 6, (0, 1, 2, 4, 5), (0, 2, 5), KVPolicy(2, 3, (2, 5)), info={"why": [1, 2]})
    again = PruningPlan.from_dict(plan.to_dict())
    assert again == plan
    assert again.removed_prefill == (3,) and again.removed_decode == (1, 3, 4)
    assert not again.is_unified


@pytest.mark.parametrize(
    "prefill, decode, message",
    [
        ((0, 2, 1), (0,), "sorted"),
        ((0, 1, 1), (0,), "sorted, unique"),
        ((0, 6), (0,), r"in \[0, 6\)"),
        ((-1, 0), (0,), r"in \[0, 6\)"),
        ((0, 1, 2), (0, 3), "subset of prefill_layers"),
        ((0, 1), (), "empty"),
    ],
)
def test_invalid_plans_are_rejected(prefill, decode, message):
    with pytest.raises(ValueError, match=message):
        PruningPlan("x", 6, prefill, decode)


def test_kv_policy_layers_must_be_decode_layers():
    with pytest.raises(ValueError, match="not decode layers"):
        PruningPlan("x", 4, (0, 1, 2), (0, 1), KVPolicy(1, 1, (2,)))
    with pytest.raises(ValueError, match="at least one position"):
        KVPolicy(0, 0, (1,))
    with pytest.raises(ValueError, match=">= 0"):
        KVPolicy(-1, 2)


def test_dense_and_unified():
    plan = PruningPlan.dense("unpruned", 3)
    assert plan.prefill_layers == plan.decode_layers == (0, 1, 2) and plan.is_unified
    assert not PruningPlan("x", 3, (0, 1, 2), (0, 1, 2), KVPolicy(1, 1, (0,))).is_unified


def test_two_layer_sets_without_kv_pruning_are_not_unified():
    """decode ⊊ prefill with every position sent is still a PD plan: one ordinary forward (unified mode, a unified
    export) would run the prefill layers in decode too."""
    assert not PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 3)).is_unified


def test_removed_layers_are_the_complement_through_the_last_layer():
    plan = PruningPlan("x", 6, (0, 1, 2, 3, 4), (1, 4))
    assert plan.removed_prefill == (5,) and plan.removed_decode == (0, 2, 3, 5)
    assert PruningPlan.dense("u", 6).removed_decode == ()


def test_first_last_rejects_a_negative_count_on_either_side():
    for n_first, n_last in ((-1, 2), (2, -1)):
        with pytest.raises(ValueError, match=">= 0"):
            KVPolicy(n_first, n_last, (0,))


@pytest.mark.parametrize("prefill, n_layers", [((0, 1.5), 4), ((0, "1"), 4), ((0, True), 4), ((0, None), 4), (5, 4),
                                               ((0, 1), 2.5), ((0, 1), True), ((0, 1), "4")])
def test_non_integer_layers_and_depths_are_refused_not_truncated(prefill, n_layers):
    """int() took 1.5 as layer 1, "1" and True as 1, and a depth of 2.5 let layer 2 in: another plan, run silently."""
    with pytest.raises(PlanError, match="integer|sequence"):
        PruningPlan("x", n_layers, prefill, (0,))


@pytest.mark.parametrize("change", [{"n_layers": 2.5}, {"prefill_layers": [0, 1.5]}, {"kv_policy": None},
                                    {"kv_policy": {"n_first": 1.5, "n_last": 1, "layers": [1]}},
                                    {"kv_policy": {"n_first": 1, "n_last": 1, "layers": [1.7]}},
                                    {"kv_policy": {"kind": "streaming", "budget": {"tokens": 2.5}}}])
def test_a_stored_plan_with_a_non_integer_value_is_refused_with_a_plan_error(change):
    stored = {**PruningPlan("x", 4, (0, 1, 2), (0, 1), KVPolicy(1, 1, (1,))).to_dict(), **change}
    with pytest.raises(PlanError):
        PruningPlan.from_dict(stored)


def test_numpy_integers_are_taken_as_layer_indices():
    np = pytest.importorskip("numpy")
    plan = PruningPlan("x", np.int64(4), np.arange(4), (np.int64(0), 2), KVPolicy(np.int64(1), 1, [np.int64(2)]))
    assert plan == PruningPlan("x", 4, (0, 1, 2, 3), (0, 2), KVPolicy(1, 1, (2,)))
    assert type(plan.n_layers) is int and all(type(i) is int for i in plan.prefill_layers + plan.kv_policy.layers)


def test_integer_options_are_checked_also_where_annotations_are_types():
    """A plug-in policy's module without `from __future__ import annotations` has `int`, not "int", as its fields'
    annotations: the check read only the strings, so its 1.5 passed as it was."""
    import dataclasses

    from harness.pd.kv.base import check_integer_options

    opts = dataclasses.make_dataclass("Opts", [("k", int), ("layers", tuple[int, ...])], frozen=True)
    for bad in (opts(1.5, (1,)), opts(1, (1, 2.5)), opts(True, ())):
        with pytest.raises(ValueError, match="need an integer|need integers"):
            check_integer_options(bad)
    good = opts(2, [3, 4])
    check_integer_options(good)
    assert good == opts(2, (3, 4))
