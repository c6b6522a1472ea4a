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
