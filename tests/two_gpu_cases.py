"""The cases tests/test_two_gpus.py runs twice: on the tiny random Llama as it is, and spread over two virtual
GPUs (tests/virtual_gpus.py, in a process of its own). Both sides call these functions, so they run the same work.
Eager attention on both: SDPA picks its kernel by device type, and the virtual device is not a CPU to it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness.config import RunConfig
from harness.pd.models import LoadedModel, device_map_summary, load_model
from harness.pd.plan import KVBudget, KVPolicy, PruningPlan

FIRST_LAST = KVPolicy(1, 2, (1, 3))  # first/last tokens in layers 1 and 3
ALL, PREFILL = (0, 1, 2, 3), (0, 1, 3)
# (mode, plan): every KV policy kind (head-shared, per head, observed in prefill), a unified plan, and prefill's
# and decode's last layers on different devices (layer 3 on vgpu:0, layer 2 on vgpu:1)
PLANS = {
    "unified": ("unified", PruningPlan("u", 4, (0, 2, 3), (0, 2, 3))),
    "first_last": ("disaggregated", PruningPlan("fl", 4, PREFILL, (0, 1, 3), kv_policy=FIRST_LAST)),
    "streaming": ("disaggregated", PruningPlan("st", 4, PREFILL, (1, 3), kv_policy=KVPolicy(
        kind="streaming", budget=KVBudget(tokens=5)))),
    "snapkv": ("disaggregated", PruningPlan("sk", 4, ALL, (0, 1, 2), kv_policy=KVPolicy(
        kind="snapkv", budget=KVBudget(tokens=4), window=4, kernel=3))),
    "h2o": ("disaggregated", PruningPlan("h2", 4, ALL, (1, 2, 3), kv_policy=KVPolicy(
        kind="h2o", budget=KVBudget(ratio=0.5), recent=2))),
    "pyramidkv": ("disaggregated", PruningPlan("py", 4, PREFILL, (0, 1, 3), kv_policy=KVPolicy(
        kind="pyramidkv", budget=KVBudget(match=FIRST_LAST), window=4, kernel=3))),
}
# every registered method but those that need gradients (autograd does not run on the virtual device) and `manual`
# (it needs layer sets given); streamline's replacement and PDTrim's healing run with 0 training steps
NOT_RUN = {"shortened_taylor", "stage:shortened_taylor", "manual"}
SETS = (
    "calib.n_samples=8", "calib.max_tokens=64", "pd_ppl.prompt_tokens=64", "pd_ppl.cont_tokens=8", "pd_ppl.docs=2",
    "passkey.lengths=384", "passkey.depths=0.5", "passkey.max_new_tokens=6",
    *(f"{m}.k=1" for m in ("shortgpt", "random", "tail", "sleb", "shortened_ppl", "streamline")),
    "shortened_ppl.keep_first=1", "shortened_ppl.keep_last=1",
    # training methods with no step: their copies of placed blocks and the data they feed them, without autograd
    "streamline.replace=ffn", "streamline.replace_steps=0", "pdtrim.heal=true", "pdtrim.heal_steps=0",
    "pdtrim.k_prefill=1", "pdtrim.k_decode=2", "pdtrim.k_unified=2", "pdtrim.d_t=-1.0", "pdtrim.search_samples=4",
    "pdtrim.max_cont=8", "pdtrim.probe_prompts=2", "pdtrim.probe_tokens=64", "pdtrim.probe_steps=2",
    "pdtrim.n_first=2", "pdtrim.n_last=4",
    *(f"{m}.base_options=k_prefill=1 k_decode=2 k_unified=2 d_t=-1.0 search_samples=4 max_cont=8 probe_prompts=2 "
      "probe_tokens=64 probe_steps=2 n_first=2 n_last=4" for m in ("h2o", "pyramidkv", "snapkv", "streamingllm")),
    *(f"stage:{m}.{o}" for m in ("random", "shortened_ppl", "shortgpt", "sleb", "tail")
      for o in ("k_prefill=1", "k_decode=2", "k_unified=2")),
    "stage:shortened_ppl.keep_first=1", "stage:shortened_ppl.keep_last=1",
)


def eager_tiny() -> LoadedModel:
    loaded = load_model("random:tiny", device="cpu", dtype="float32", seed=0)
    loaded.model.config._attn_implementation = "eager"
    return loaded


def score_all(model, only: str | None = None) -> dict[str, dict]:
    """Per case of PLANS (or case `only`): log-likelihoods, greedy generations and the KV tally, as JSON values."""
    from conftest import random_requests

    from harness.quality.scoring import Scorer

    reqs = random_requests(4, 250, seed=3)
    out = {}
    for name in [only] if only else PLANS:
        mode, plan = PLANS[name]
        s = Scorer(model, plan, mode, max_length=512, batch_size=3)
        ll = [[lp, greedy] for lp, greedy in s.loglikelihood(reqs)]
        gen = s.generate([c for c, _ in reqs[:4]], 5)
        out[name] = {"ll": ll, "gen": gen, "tally": s.tally.as_dict()}
    return out


def latency_all(model, case: str) -> dict[str, dict]:
    """Per decode mode (eager, static): the bytes a latency run of case `case` hands over and its greedy tokens."""
    from harness.latency.measure import Workload, measure

    mode, plan = PLANS[case]
    out = {}
    for decode_mode in ("eager", "static"):
        m = measure(model, plan, Workload(32, 4, 2), warmup=1, repeats=1, decode_mode=decode_mode)
        out[decode_mode] = {"kv_bytes": m.kv_bytes, "kv_bytes_paged": m.kv_bytes_paged, "tokens": m.tokens.tolist()}
    return out


CALIB_ROWS = [[5, 9, 17, 3, 8, 11, 2, 40, 7], [7, 1, 9, 30, 12, 4], [3, 3, 8, 21, 60, 2, 9, 14, 5, 77]]


def trained_copies(model) -> dict[str, dict]:
    """The copies methods train, with 0 steps (autograd does not run on the virtual devices): streamline's
    replacement for each one-block run (data, MSE, the model's output with it installed) and PDTrim's healed
    block after each run (its MSE). Runs on both sides of each device boundary."""
    from harness.pd import arch
    from harness.pd.batching import pad_tokens
    from harness.pd.cache import PDCache
    from harness.pd.engine import run_layers
    from harness.quality.calibration import CalibrationSet
    from methods.depth import streamline
    from methods.pdtrim import healing

    calib = CalibrationSet([], CALIB_ROWS)
    batch = pad_tokens(CALIB_ROWS, arch.model_device(model))
    out = {}
    for start in range(arch.n_layers(model) - 1):
        x, y = streamline.run_pairs(model, calib, start, 1, 2)
        ffn, report = streamline.train_replacement(model, start, x, y, 0, 1e-3, 16, 0)
        with streamline.installed(model, [start], ffn):
            h = run_layers(model, [i for i in range(arch.n_layers(model)) if i != start], batch.ids, batch.positions,
                           batch.valid, PDCache(retain=()))
        out[f"streamline {start}"] = {"x": float(x.sum()), "y": float(y.sum()), "mse": report["mse_before"],
                                      "out": float(h[batch.valid].double().sum())}
    runs = [((i,), i + 1) for i in range(arch.n_layers(model) - 1)]
    _, report = healing.heal(model, list(calib.batches(2, arch.model_device(model))), runs, 0, 1e-3, 0)
    out["healing"] = {j: (r["mse_before"], r["mse_after"]) for j, r in report.items()}
    return out


def method_names() -> list[str]:
    import methods

    return [m for m in methods.names() if m not in NOT_RUN]


def run_all(out: Path, data_dir: str, placed: Callable | None = None) -> list:
    """A quality run of every method in both modes (arc_easy, pd_ppl, passkey) into `out`; `placed(model)`
    spreads the model first."""
    from harness.run import pipeline

    loaded = eager_tiny()
    if placed is not None:
        loaded.model = placed(loaded.model)
        loaded.description["device_map"] = device_map_summary(loaded.model)
    cfg = RunConfig(model="random:tiny", methods=tuple(method_names()), tasks=("arc_easy", "pd_ppl", "passkey"),
                    limit=3, modes=("unified", "disaggregated"), device="cpu", data_dir=data_dir, overrides=SETS)
    return pipeline.run(cfg, out, loaded=loaded)
