"""`--device-map`: a model spread over CPU memory and disk (accelerate big-model placement) gives the
same scores and KV bytes as the unsplit model through the PD engine."""

from __future__ import annotations

import pytest
import torch
from conftest import random_requests

from harness.config import RunConfig
from harness.errors import UsageError
from harness.pd import arch
from harness.pd.models import Placement, load_model
from harness.pd.plan import KVPolicy, PruningPlan
from harness.quality.scoring import Scorer
from harness.run import pipeline

# tiny is ~760 KB of float32 weights: 400 KB of "CPU memory" keeps the embedding and the first layer,
# the rest goes to disk and is loaded by accelerate's hooks at each forward
SPLIT = ("auto", "cpu=400KB")


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    return load_model("random:tiny", device="cpu", dtype="float32", seed=0, placement=Placement.parse(*SPLIT, str(folder)))


def test_a_placed_random_model_is_built_in_host_memory_before_it_is_spread(monkeypatch, tmp_path):
    """With --device-map, the whole model is not first made on the device (here a device with no storage): one
    larger than a GPU would run out of its memory before accelerate could place it."""
    import harness.pd.models as models

    seen = []
    monkeypatch.setattr(models, "dispatch", lambda model, placement: seen.append({p.device.type for p in model.parameters()})
                        or model)
    models.random_model("tiny", torch.float32, torch.device("meta"), placement=Placement.parse(*SPLIT, str(tmp_path)))
    assert seen == [{"cpu"}]


def test_forced_split_really_offloads_layers_to_disk(placed):
    dmap = placed.model.hf_device_map
    assert dmap["model.layers.0"] == "cpu" and dmap["model.layers.3"] == "disk"
    assert placed.description["device_map"] == {"cpu": 2, "disk": 6}
    assert {p.device.type for p in arch.decoder_layers(placed.model)[3].parameters()} == {"meta"}  # not resident
    assert arch.model_device(placed.model) == torch.device("cpu")  # where inputs go


@pytest.mark.parametrize("mode", ["unified", "disaggregated"])
def test_split_model_scores_and_bytes_equal_the_unsplit_model(tiny, placed, mode):
    policy = KVPolicy(layers=(3,), n_first=1, n_last=2) if mode == "disaggregated" else None
    plan = PruningPlan("x", 4, (0, 1, 3), (0, 3) if mode == "disaggregated" else (0, 1, 3),
                       **({"kv_policy": policy} if policy else {}))
    reqs = random_requests(8, 256, seed=5)
    ref, split = (Scorer(m, plan, mode, max_length=512, batch_size=3) for m in (tiny.model, placed.model))
    assert split.loglikelihood(reqs) == ref.loglikelihood(reqs)
    assert split.tally.as_dict() == ref.tally.as_dict()
    prompts = [c for c, _ in reqs[:4]]
    assert split.generate(prompts, 6) == ref.generate(prompts, 6)
    if mode == "disaggregated":
        assert ref.tally.kv_bytes > 0


def test_a_model_of_which_nothing_fits_in_memory_goes_whole_to_disk_and_scores_as_the_unsplit_model(tiny, tmp_path):
    """With --max-memory below the first module, accelerate maps the root module ("") to disk, writes no offload index
    for it and then failed to read one (FileNotFoundError .../index.json): each child of the model now goes to disk."""
    whole = load_model("random:tiny", device="cpu", dtype="float32", seed=0,
                       placement=Placement.parse("auto", "cpu=100KB", str(tmp_path / "off")))
    assert set(whole.model.hf_device_map.values()) == {"disk"} and (tmp_path / "off" / "index.json").is_file()
    plan = PruningPlan("x", 4, (0, 1, 3), (0, 3), kv_policy=KVPolicy(layers=(3,), n_first=1, n_last=2))
    reqs = random_requests(4, 256, seed=6)
    ref, disk = (Scorer(m, plan, "disaggregated", max_length=512, batch_size=2) for m in (tiny.model, whole.model))
    assert disk.loglikelihood(reqs) == ref.loglikelihood(reqs) and disk.tally.as_dict() == ref.tally.as_dict()


def test_handed_over_kv_lives_on_each_layers_device(placed):
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 3))
    s = Scorer(placed.model, plan, "disaggregated", max_length=512)
    out = s._prefill([[1, 2, 3, 4, 5]])
    sent = s._handoff(out, torch.tensor([0]))
    assert sent.layers == [0, 1, 3]
    for layer in sent.layers:  # on CPU every execution device is the CPU; on GPUs, the layer's GPU
        hook = getattr(arch.decoder_layers(placed.model)[layer], "_hf_hook", None)
        want = torch.device(getattr(hook, "execution_device", None) or "cpu")
        assert sent.keys[layer].device.type == want.type


def test_a_run_with_device_map_has_the_unsplit_runs_records(tiny, data_dir, tmp_path):
    base = RunConfig(model="random:tiny", methods=("unpruned", "tail"), tasks=("arc_easy",), limit=4,
                     modes=("disaggregated",), device="cpu", data_dir=str(data_dir), overrides=("tail.k=1",))
    a = pipeline.run(base, tmp_path / "a", loaded=tiny)
    split = RunConfig(**{**base.__dict__, "device_map": "auto", "max_memory": "cpu=400KB",
                         "offload_folder": str(tmp_path / "off")})
    b = pipeline.run(split, tmp_path / "b")  # loads the model itself, placed
    for x, y in zip(a, b):
        assert x.scores == y.scores and x.kv == y.kv and x.run_key == y.run_key
        assert y.config["device_map"] == "auto" and y.model["device_map"] == {"cpu": 2, "disk": 6}


@pytest.mark.parametrize("args, message", [
    (("balanced_high",), "--device-map 'balanced_high': expected one of auto, balanced"),
    (("auto", "cpu:20GiB"), "expected DEVICE=SIZE items"),
    ((None, "cpu=1GiB"), "add --device-map auto"),
])
def test_bad_placement_is_a_usage_error(args, message):
    with pytest.raises(UsageError, match=message):
        Placement.parse(*args)


def test_layers_that_would_go_to_disk_need_an_offload_folder(data_dir, cli):
    r = cli("--model", "random:tiny", "--device", "cpu", "-q", "--methods", "unpruned", "--tasks", "arc_easy",
            "--device-map", "auto", "--max-memory", "cpu=400KB", data_dir=data_dir)
    assert r.returncode == 2 and "add --offload-folder DIR" in r.stderr and "Traceback" not in r.stderr


def test_device_map_under_data_parallel_ranks_is_refused_before_anything_starts(data_dir, cli, monkeypatch):
    """Each rank would spread its own copy of the model over every GPU it sees (2 ranks on 2 GPUs: two models on
    each GPU, not data parallelism); refused before the ranks' process group is set up."""
    from harness.quality import distributed

    monkeypatch.setattr(distributed, "current", lambda: pytest.fail("the process group was set up first"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli("--model", "random:tiny", "--device", "cpu", "-q", "--methods", "unpruned", "--tasks", "arc_easy",
            "--device-map", "auto", data_dir=data_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--device-map under 2 data-parallel ranks: each rank would spread its own copy" in r.stderr


PDTRIM_SMALL = ("calib.n_samples=8", "calib.max_tokens=64", "pdtrim.k_prefill=1", "pdtrim.k_decode=2", "pdtrim.d_t=-1.0",
                "pdtrim.search_samples=6", "pdtrim.sensitivity_samples=2", "pdtrim.max_cont=8", "pdtrim.probe_prompts=2",
                "pdtrim.probe_tokens=64", "pdtrim.probe_steps=2")


def _screen_of(record) -> dict | None:
    found = [v for k, v in _walk(record.plan["info"]) if k == "screen"]
    assert found, "the search records its screen"
    return found[0]


def _walk(d, depth=0):
    for k, v in d.items():
        yield k, v
        if isinstance(v, dict) and depth < 3:
            yield from _walk(v, depth + 1)


def test_pdtrim_screens_a_placed_model_without_copying_it(data_dir, tmp_path, monkeypatch):
    """Where bfloat16 is fast, PDTrim's search screened on a bfloat16 copy of the whole model: a placed model (spread
    because it does not fit one device) was copied, and one with offloaded layers failed the cell (accelerate:
    "You can't move a model that has some modules offloaded"). It now screens with the float32 subset objective."""
    from methods.pdtrim import screen

    monkeypatch.setattr(screen, "bfloat16_is_fast", lambda device: True)  # as on an AMX CPU or a GPU
    cfg = RunConfig(model="random:tiny", methods=("pdtrim",), tasks=("arc_easy",), limit=2, modes=("disaggregated",),
                    device="cpu", data_dir=str(data_dir), overrides=PDTRIM_SMALL, device_map=SPLIT[0],
                    max_memory=SPLIT[1], offload_folder=str(tmp_path / "off"))
    [record] = pipeline.run(cfg, tmp_path / "placed")
    assert _screen_of(record)["dtype"] == "float32"
    with pytest.raises(pipeline.CellsFailed, match="pdtrim.screen=bfloat16 screens on a bfloat16 copy"):
        pipeline.run(RunConfig(**{**cfg.__dict__, "overrides": (*PDTRIM_SMALL, "pdtrim.screen=bfloat16")}), tmp_path / "b")


@pytest.mark.parametrize("method, sets", [
    ("shortened_taylor", ("shortened_taylor.k=1", "shortened_taylor.keep_first=1", "shortened_taylor.keep_last=1")),
    ("streamline", ("streamline.k=1", "streamline.replace=ffn", "streamline.replace_steps=2")),
    ("pdtrim", (*PDTRIM_SMALL[2:], "pdtrim.heal=true", "pdtrim.heal_steps=2")),
])
def test_methods_that_train_refuse_offloaded_layers(method, sets, data_dir, tmp_path):
    """An offloaded layer's parameters are `meta` (accelerate loads a copy for each forward): Taylor scores gave those
    blocks 0 (removed first), and healing and the replacement trained copies of nothing, all without a word."""
    cfg = RunConfig(model="random:tiny", methods=(method,), tasks=("arc_easy",), limit=2, modes=("disaggregated",),
                    device="cpu", data_dir=str(data_dir), overrides=("calib.n_samples=8", "calib.max_tokens=64", *sets),
                    device_map=SPLIT[0], max_memory=SPLIT[1], offload_folder=str(tmp_path / "off"))
    with pytest.raises(pipeline.CellsFailed, match=r"needs the weights of every decoder layer resident, but --device-map "
                                                   r"offloaded layers \[1, 2, 3\] to CPU memory or disk") as e:
        pipeline.run(cfg, tmp_path / "out")
    assert all(f.bad_input for f in e.value.failures)  # exit 2: what to change is in the message


def test_pdtrims_objective_with_the_lm_head_offloaded_equals_the_resident_models(tiny, placed):
    """PDTrim's teacher took pᵀW from the LM head's weight directly. Offloaded, that weight is `meta` outside the head's
    forward, and `p @ meta` is an uninitialised CPU tensor, not an error: every objective value was garbage, NaN in
    some runs (the search then failed, a flaky test) and plausible numbers in others (a wrong plan, silently)."""
    from methods.pdtrim.objectives import CalibSplit, StageObjective

    assert {p.device.type for p in arch.lm_head(placed.model).parameters()} == {"meta"}  # offloaded to disk
    rows = [[(7 * i + 3 * j) % 250 + 1 for j in range(20 + i)] for i in range(6)]
    split = CalibSplit.from_calibration(rows, 6, 8, seed=0)
    resident, offloaded = (StageObjective(m, split, batch_size=3) for m in (tiny.model, placed.model))
    for removed in ((), (1,), (2,)):
        assert offloaded.prefill(removed) == pytest.approx(resident.prefill(removed), rel=1e-5, abs=1e-7)
    assert offloaded.decode((1, 2), (1,)) == pytest.approx(resident.decode((1, 2), (1,)), rel=1e-5, abs=1e-7)
