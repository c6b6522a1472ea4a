"""Stage objectives: resumable forwards give the same KL as a from-scratch PD computation."""

import pytest
import torch
from conftest import pd_kl_from_scratch

from methods.pdtrim.objectives import CalibSplit, StageObjective


@pytest.fixture(scope="module")
def split():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(6, 40, (20,), generator=g)]
    return CalibSplit.from_calibration(ids, 16, 8, seed=0)


def from_scratch(tiny, split, rd, rp):
    return pd_kl_from_scratch(tiny.model, split.prompts, split.conts, rd, rp)


def test_objectives_match_from_scratch_pd_runs(tiny, split):
    obj = StageObjective(tiny.model, split, batch_size=5)
    assert obj.prefill(()) < 1e-6
    for r in [(1,), (2,), (1, 3), (0,)]:  # each resumes from a different first changed layer
        assert obj.prefill(r) == pytest.approx(from_scratch(tiny, split, r, r), rel=1e-4)
        assert obj.decode(r, r) == pytest.approx(obj.prefill(r), rel=1e-4)
    obj.set_prefill_base((1,))
    assert obj.prefill((1, 3)) == pytest.approx(from_scratch(tiny, split, (1, 3), (1, 3)), rel=1e-4)
    for rd in [(1, 2), (1, 3), (0, 1)]:
        assert obj.decode(rd, (1,)) == pytest.approx(from_scratch(tiny, split, rd, (1,)), rel=1e-4)
    with pytest.raises(ValueError, match="must contain prefill removal"):
        obj.decode((2,), (1,))


def test_resuming_saves_work(tiny, split):
    obj = StageObjective(tiny.model, split, batch_size=8)
    obj.set_prefill_base(())
    before = obj.layer_token_passes
    obj.prefill((3,))  # resumes at layer 3: runs no layer (3 is the last one)
    assert obj.layer_token_passes == before
    obj.prefill((0,))  # resumes at layer 0: runs the 3 other layers
    assert obj.layer_token_passes - before == 3 * obj.full_tokens
    assert obj.work()["evaluations"] == 2


def _fresh(tiny, split, rp_base=None, rd_base=None):
    obj = StageObjective(tiny.model, split, batch_size=5)
    if rp_base is not None:
        obj.set_prefill_base(rp_base, from_scratch=True)
    if rd_base is not None:
        obj.set_decode_base(*rd_base)
    return obj


def test_moving_the_base_to_the_best_candidate_costs_no_forward_and_changes_no_value(tiny, split):
    """A greedy step accepts its lowest candidate: the new base is that candidate's own forward
    (no layer runs), and every later value is bit-identical to one resumed from a base computed
    from scratch; a base that is not the best candidate resumes from the old base instead."""
    obj = StageObjective(tiny.model, split, batch_size=5)
    values = {j: obj.prefill({j}) for j in range(4)}
    best = min(values, key=values.get)
    before = obj.layer_token_passes
    obj.set_prefill_base({best})
    assert obj.layer_token_passes == before
    ref = _fresh(tiny, split, rp_base={best})
    for j in set(range(4)) - {best}:
        assert obj.prefill({best, j}) == ref.prefill({best, j})
    other = next(j for j in range(4) if j != best and j > 0)
    obj.set_prefill_base({best, other})  # not the best of this step: resumed at the first difference
    ref = _fresh(tiny, split, rp_base={best, other})
    assert obj.prefill({best, other, 3 if 3 not in (best, other) else 2}) == \
        ref.prefill({best, other, 3 if 3 not in (best, other) else 2})
    # decode: same for the decode base
    rp = frozenset({1})
    vals = {j: obj.decode(rp | {j}, rp) for j in (0, 2, 3)}
    top = min(vals, key=vals.get)
    before = obj.layer_token_passes
    obj.set_decode_base(rp | {top}, rp)
    assert obj.layer_token_passes == before
    ref = _fresh(tiny, split, rd_base=(rp | {top}, rp))
    for j in {0, 2, 3} - {top}:
        assert obj.decode(rp | {top, j}, rp) == ref.decode(rp | {top, j}, rp)


def test_the_kept_forward_is_the_lowest_candidates_whatever_the_order_they_came_in(tiny, split):
    """The objective keeps the forward of the lowest candidate seen since the base moved, not the last or the highest:
    block 3 is left out (removing the last block leaves no layer to run after it, so a resumed base costs nothing)."""
    obj = StageObjective(tiny.model, split, batch_size=5)
    for order in ((0, 1, 2), (2, 1, 0)):
        values = {j: obj.prefill({j}) for j in order}
        best = min(values, key=values.get)
        before = obj.layer_token_passes
        obj.set_prefill_base({best})
        assert obj.layer_token_passes == before, order
        obj.set_prefill_base(set())  # back to the dense base (resumed: the next candidates compare afresh)


def test_calibration_too_short_for_the_objective_is_bad_input():
    from harness.errors import UsageError

    with pytest.raises(UsageError, match="at least 4 tokens .* the longest here has 3: raise calib.max_tokens"):
        CalibSplit.from_calibration([[1, 2, 3], [4, 5]], n_samples=8, max_cont=4, seed=0)
    split = CalibSplit.from_calibration([[1, 2, 3], [4, 5, 6, 7]], n_samples=8, max_cont=4, seed=0)
    assert split.prompts == [[4, 5]] and split.conts == [[6, 7]]  # short rows are left out
