"""Stage objectives: resumable forwards give the same KL as a from-scratch PD computation."""

import pytest
import torch
import torch.nn.functional as F

from harness.engine import final_logits, run_layers
from harness.objectives import CalibSplit, StageObjective
from harness.plan import PruningPlan
from harness.scoring import Scorer


@pytest.fixture(scope="module")
def split():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(6, 40, (20,), generator=g)]
    return CalibSplit.from_calibration(ids, 16, 8, seed=0)


def from_scratch(tiny, split, rd, rp):
    """Mean KL(dense || PD) over continuation tokens, one request at a time through prefill, handoff, decode."""
    keep = lambda r: tuple(i for i in range(4) if i not in r)  # noqa: E731
    plan = PruningPlan("x", 4, keep(rp), keep(rd))
    total, n = 0.0, 0
    for p, c in zip(split.prompts, split.conts):
        s = Scorer(tiny.model, plan, "disaggregated", max_length=4096)
        last, cache, lengths = s._prefill([p])
        dcache = s._handoff(cache, lengths, torch.tensor([0]))
        hs = [last]
        if len(c) > 1:
            pos = (len(p) + torch.arange(len(c) - 1))[None]
            hs.append(run_layers(tiny.model, plan.decode_layers, torch.tensor([c[:-1]]), pos,
                                 torch.ones(1, len(c) - 1, dtype=torch.bool), dcache)[0])
        with torch.inference_mode():
            student = F.log_softmax(final_logits(tiny.model, torch.cat(hs)), -1)
            teacher = F.log_softmax(tiny.model(torch.tensor([p + c[:-1]])).logits[0, len(p) - 1:].float(), -1)
        total += float(F.kl_div(student, teacher, log_target=True, reduction="sum"))
        n += len(c)
    return total / n


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
