"""Data-parallel evaluation: 2 processes (gloo on CPU) give the same records as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.quality.distributed import Dist
from harness.quality.lm import PDLM

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--model", "random:tiny", "--device", "cpu", "-q", "--methods", "unpruned,random", "--set", "random.k=1",
        "--tasks", "arc_easy,boolq,pd_ppl,passkey", "--limit", "5", "--mode", "both",
        "--set", "pd_ppl.prompt_tokens=64,128", "--set", "pd_ppl.cont_tokens=16", "--set", "pd_ppl.docs=3",
        "--set", "passkey.lengths=400,500", "--set", "passkey.repeats=1", "--log-samples"]


def _env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "HARNESS_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def test_two_rank_accelerate_run_equals_single_process(data_dir, tmp_path, cli, monkeypatch):
    import torch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the single process in this one, with one thread as each rank has (OMP_NUM_THREADS=1)
    try:
        single = cli(*ARGS, "--out", tmp_path / "single", data_dir=data_dir)
    finally:
        torch.set_num_threads(threads)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29517",
              "-m", "harness", *ARGS, "--out", str(tmp_path / "dp")]
    dp = subprocess.run(launch, cwd=ROOT, env=_env(data_dir), capture_output=True, text=True, timeout=600)
    assert dp.returncode == 0, dp.stderr[-3000:]
    assert dp.stdout.count("records and summary.csv in") == 1  # only rank 0 reports
    files = sorted(p.name for p in (tmp_path / "single").glob("*__*.json"))
    assert len(files) == 4 and files == sorted(p.name for p in (tmp_path / "dp").glob("*__*.json"))
    for name in files:
        a = json.loads((tmp_path / "single" / name).read_text())
        b = json.loads((tmp_path / "dp" / name).read_text())
        assert b["environment"]["data_parallel_ranks"] == 2 and a["environment"]["data_parallel_ranks"] == 1
        assert a["run_key"] == b["run_key"] and a["n_samples"] == b["n_samples"]
        assert a["kv"] == b["kv"], name  # byte totals summed over ranks: exactly the single-process totals
        assert a["extra"]["kv_by_setting"] == b["extra"]["kv_by_setting"]
        if "disaggregated" in name:
            assert a["kv"]["arc_easy"]["kv_bytes"] > 0 and a["kv"]["passkey"]["handoffs"] == a["n_samples"]["passkey"] == 5
        assert (a["plan"]["prefill_layers"], a["plan"]["decode_layers"]) == (b["plan"]["prefill_layers"], b["plan"]["decode_layers"])
        for task, metrics in a["scores"].items():
            for metric, v in metrics.items():
                w = b["scores"][task][metric]
                assert w["value"] == pytest.approx(v["value"], rel=1e-9, abs=1e-12), (name, task, metric)
                if v["stderr"] is not None:  # summation order differs across ranks: last-bit differences
                    assert w["stderr"] == pytest.approx(v["stderr"], rel=1e-9)
        assert a["extra"]["task_details"]["passkey"] == b["extra"]["task_details"]["passkey"]
        assert a["extra"]["items"] == b["extra"]["items"], name  # per-item ids and values for paired tests
    logs = sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single" / "samples").rglob("*.jsonl"))
    assert len(logs) == 16 and logs == sorted(p.relative_to(tmp_path / "dp") for p in (tmp_path / "dp" / "samples").rglob("*.jsonl"))
    for log in logs:  # --log-samples: one line per item, each once, in order; no padding copy's answer in a line
        a, b = ([json.loads(line) for line in (tmp_path / run / log).read_text().splitlines()] for run in ("single", "dp"))
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b], log
        for x, y in zip(a, b):
            if "resps" in x:  # lm-eval's tasks (log-likelihoods may differ in the last bits: other batches per rank)
                assert [len(r) for r in x["resps"]] == [len(r) for r in y["resps"]], (log, x["doc_id"])
                assert {m: x[m] for m in x["metrics"]} == {m: y[m] for m in y["metrics"]}, (log, x["doc_id"])
            else:
                assert x == y, log


class _Req:
    def __init__(self, repeats: int = 1) -> None:
        self.repeats = repeats


def test_padding_copies_lm_eval_appends_are_recognised():
    lm = PDLM.__new__(PDLM)
    lm._world_size = 2
    a, b = _Req(), _Req()
    assert lm._without_padding([a, b]) == ([a, b], 0)
    assert lm._without_padding([a, b, b, b]) == ([a, b], 2)  # two padding units
    c = _Req(repeats=2)  # generation with repeats: its own copies are real requests
    assert lm._without_padding([a, c, c]) == ([a, c, c], 0)
    assert lm._without_padding([a, c, c, c, c]) == ([a, c, c], 2)
    lm._world_size = 1
    assert lm._without_padding([a, b, b]) == ([a, b, b], 0)  # one process: nothing is padding


class _Inst(_Req):
    """An lm-eval `Instance` as the evaluator uses it: a `resps` list it appends each answer to."""

    def __init__(self, arg: str, repeats: int = 1) -> None:
        super().__init__(repeats)
        self.args, self.resps = (arg,), []


class _NoBarrier(Dist):
    def barrier(self) -> None:
        pass


@pytest.mark.parametrize("repeats", [1, 3])
def test_answers_to_padding_copies_do_not_stay_in_the_padded_requests_responses(repeats):
    """lm-eval pads a rank's requests with copies of its last `Instance` and appends every answer to the request it
    passed (`req.resps.append(x)`), so the padded document's `resps` held the copies' answers too: its --log-samples
    line listed them (mmlu at --limit 3 over 2 ranks: 229 answers to one choice) and a filter reading every response
    (a majority vote over `repeats`) counted them. They are gone by the barrier lm-eval calls after the requests ran."""
    lm = PDLM.__new__(PDLM)
    lm._world_size, lm.dist, lm.progress = 2, _NoBarrier(0, 2, 0), False
    lm._rolling = lambda reqs, disable_tqdm: [float(len(r.args[0])) for r in reqs]
    a, b = _Inst("x", repeats), _Inst("yy", repeats)
    cloned = [a] * repeats + [b] * repeats + [b] * repeats * 2  # lm-eval's loop: two padding units after the last request
    for x, req in zip(lm.loglikelihood_rolling(cloned), cloned, strict=True):  # lm-eval's evaluator, as it runs them
        req.resps.append(x)
    lm.barrier()
    assert a.resps == [1.0] * repeats and b.resps == [2.0] * repeats
    lm.barrier()  # nothing pending: nothing more removed
    assert b.resps == [2.0] * repeats


class _Gathered(Dist):
    """Rank 0 of 2 whose gather returns fixed per-rank parts (lm-eval's doc_iterator: rank r has docs r, r + 2, ...)."""

    def __init__(self, parts) -> None:
        super().__init__(0, 2, 0)
        object.__setattr__(self, "parts", parts)

    def gather_object(self, obj, dst=0):
        return self.parts


def test_gathered_metrics_and_samples_come_back_in_document_order():
    """lm-eval concatenates what it gathers rank by rank: 0, 2, 4, 1, 3. A bootstrap stderr depends on that order
    (LAMBADA's perplexity: 4.7e19 in one process, 7.1e19 over 2 ranks) and so do the --log-samples lines."""
    import itertools

    lm = PDLM.__new__(PDLM)
    docs = {0: [0, 2, 4], 1: [1, 3]}
    metrics = [{"t": {("acc", "none"): [float(d) for d in docs[r]]}} for r in (0, 1)]
    lm.dist = _Gathered(metrics)
    got = lm.gather_object(metrics[0])
    assert list(itertools.chain.from_iterable(p["t"][("acc", "none")] for p in got)) == [0.0, 1.0, 2.0, 3.0, 4.0]
    samples = [{"t": [{"doc_id": d, "filter": f} for f in ("a", "b") for d in docs[r]]} for r in (0, 1)]
    lm.dist = _Gathered(samples)
    got = list(itertools.chain.from_iterable(p["t"] for p in lm.gather_object(samples[0])))
    assert [(s["filter"], s["doc_id"]) for s in got] == [(f, d) for f in ("a", "b") for d in range(5)]
    # several filters (gsm8k's): each filter's run of documents, the filters in lm-eval's order (not alphabetical)
    filters = ("strict-match", "flexible-extract")
    samples = [{"t": [{"doc_id": d, "filter": f} for f in filters for d in docs[r]]} for r in (0, 1)]
    lm.dist = _Gathered(samples)
    got = list(itertools.chain.from_iterable(p["t"] for p in lm.gather_object(samples[0])))
    assert [(s["filter"], s["doc_id"]) for s in got] == [(f, d) for f in filters for d in range(5)]
    lm.dist = _Gathered(None)  # not rank 0
    assert lm.gather_object({}) is None


def test_single_process_group_is_a_no_op():
    d = Dist()
    assert d.is_main and not d.enabled
    assert d.sum_counts({"kv_bytes": 3}) == {"kv_bytes": 3}
    assert d.all_gather_object(5) == [5] and d.broadcast_object(7) == 7


def test_a_limit_below_the_number_of_ranks_is_refused_before_any_work(monkeypatch, data_dir):
    """lm-eval fails on a rank with no item of a task, and the other ranks then waited for it forever."""
    from harness.config import RunConfig
    from harness.errors import UsageError
    from harness.run import pipeline

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun / accelerate launch set it
    cfg = dict(methods=("unpruned",), data_dir=str(data_dir))
    with pytest.raises(UsageError, match=r"--limit 1 with 2 data-parallel ranks: each rank needs at least one item of "
                                         r"every task \(arc_easy\); give --limit 2 or more"):
        pipeline.prepare(RunConfig(tasks=("arc_easy", "passkey"), limit=1, **cfg))
    pipeline.prepare(RunConfig(tasks=("arc_easy",), limit=2, **cfg))
    pipeline.prepare(RunConfig(tasks=("passkey",), limit=1, **cfg))  # the harness shards its own tasks


def test_a_fractional_limit_leaving_a_rank_no_item_is_refused_before_any_cell(data_dir):
    """--limit 0.0004 keeps ceil(2376 * 0.0004) = 1 ARC-Easy item: lm-eval failed on rank 1 ("did not find any
    docs") after the model had loaded, with a traceback instead of the refusal an integer --limit 1 gets."""
    from harness.config import RunConfig
    from harness.errors import UsageError
    from harness.quality.evaluate import TaskCache, check_tasks

    tasks = TaskCache(("arc_easy", "passkey"), data_dir)
    try:
        cfg = RunConfig(methods=("unpruned",), tasks=("arc_easy", "passkey"), limit=0.0004, data_dir=str(data_dir))
        with pytest.raises(UsageError, match=r"--limit 0.0004 keeps 1 of arc_easy's 2376 items for 2 data-parallel ranks"):
            check_tasks(tasks, cfg, 2)
        check_tasks(tasks, cfg, 1)  # one process: one item is fine
        check_tasks(tasks, RunConfig(**{**cfg.__dict__, "limit": 0.001}), 2)  # 3 items
        check_tasks(tasks, RunConfig(**{**cfg.__dict__, "limit": 0.0008}), 2)  # ceil(1.9008) = 2 items: one a rank
    finally:
        tasks.close()


PLUGIN = '''
import os
from methods.registry import register
from methods.unpruned import Unpruned


@register
class FailsOnRank1(Unpruned):
    name = "fails_on_rank1"
    summary = "unpruned, but applying its plan fails on rank 1 only (an OOM on one GPU, say)"

    def apply(self, model, plan):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("out of memory on rank 1")
        return super().apply(model, plan)
'''


def test_a_cell_failing_on_one_rank_stops_the_group_instead_of_hanging(data_dir, tmp_path):
    """The failing rank went on to the next cell while the others waited in the cell's collectives forever."""
    (tmp_path / "rank_plugin.py").write_text(PLUGIN)
    env = {**_env(data_dir), "HARNESS_PLUGINS": "rank_plugin", "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531", "-m",
              "harness", "--model", "random:tiny", "--device", "cpu", "-q", "--methods", "fails_on_rank1,unpruned",
              "--tasks", "arc_easy", "--limit", "2", "--out", str(tmp_path / "dp")]
    r = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "out of memory on rank 1" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "dp" / "unpruned__disaggregated.json").exists()  # the group stopped at the failing cell


def test_a_data_parallel_run_stopped_by_sigterm_says_so_once(data_dir, tmp_path):
    """The launcher passes SIGTERM (a scheduler's stop) to every rank, each of which ends as on Ctrl-C: one line from
    rank 0 on what was kept, not one per rank."""
    import signal
    import time

    out = tmp_path / "dp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m",
              "harness", "--model", "random:tiny", "--device", "cpu", "--methods", "unpruned,tail", "--set", "tail.k=1",
              "--tasks", "arc_easy,hellaswag", "--limit", "600", "--mode", "disaggregated", "--out", str(out)]
    run = subprocess.Popen(launch, cwd=ROOT, env=_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "unpruned__disaggregated.partial.json").exists():  # arc_easy done, hellaswag under way
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert err.count("interrupted: the finished tasks of 1 cell(s) kept in") == 1, err[-3000:]
    assert "rerun the same command to resume" in err


def test_a_refusal_every_rank_meets_is_printed_once(data_dir, tmp_path):
    """Every rank refused `--limit 1` over 2 ranks and printed the same error line; rank 0 alone says it now (the
    others wait, and the launcher stops them when rank 0 exits with the refusal)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29535", "-m",
              "harness", "--model", "random:tiny", "--device", "cpu", "-q", "--methods", "unpruned", "--tasks", "arc_easy",
              "--limit", "1", "--out", str(tmp_path / "dp")]
    r = subprocess.run(launch, cwd=ROOT, env=_env(data_dir), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("error: --limit 1 with 2 data-parallel ranks") == 1, r.stderr[-3000:]


@pytest.mark.parametrize("collective", ["barrier", "all_gather_object", "gather_object", "broadcast_object",
                                        "all_gather_tensor"])
def test_a_collective_broken_by_a_peer_that_left_on_the_stop_signal_ends_as_interrupted(monkeypatch, collective):
    """The launcher signals every rank; under load a peer took its SIGTERM first and left, and rank 0's collective
    raised gloo's 'Connection closed by peer' before its own SIGTERM came: the transport error, not the 'interrupted'
    line. A broken collective now waits a moment for this rank's signal; without one it raises the error."""
    import signal
    import threading

    import torch

    from harness.cli.interrupt import sigterm_as_ctrl_c
    from harness.quality import distributed

    def broken(*args, **kwargs):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29533")

    for name in ("barrier", "all_gather_object", "gather_object", "broadcast_object_list", "all_gather"):
        monkeypatch.setattr(torch.distributed, name, broken)
    d = distributed.Dist(rank=0, world_size=2)
    call = {"barrier": lambda: d.barrier(), "all_gather_object": lambda: d.all_gather_object(1),
            "gather_object": lambda: d.gather_object(1), "broadcast_object": lambda: d.broadcast_object(1),
            "all_gather_tensor": lambda: d.all_gather_tensor(torch.ones(2))}[collective]
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))  # this rank's signal, after the error
    with sigterm_as_ctrl_c():
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                call()
        finally:
            timer.cancel()  # the error raised at once (no wait): no SIGTERM left to come
            timer.join()
    monkeypatch.setattr(distributed, "PEER_LOST_GRACE_S", 0.2)  # a peer that crashed: no signal comes
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        call()


def test_a_collective_broken_after_a_stop_a_library_swallowed_ends_as_interrupted_at_once(monkeypatch):
    """This rank's stop came earlier and a library caught its KeyboardInterrupt (harness.stops), so no signal is left
    to come: the broken collective raises KeyboardInterrupt at once rather than the transport's error after the
    wait; with no stop noted, the error as before."""
    import time

    import torch

    from harness import stops
    from harness.cli.interrupt import sigterm_as_ctrl_c
    from harness.quality import distributed

    def broken(*args, **kwargs):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29533")

    monkeypatch.setattr(torch.distributed, "barrier", broken)
    monkeypatch.setattr(distributed, "PEER_LOST_GRACE_S", 30.0)
    with sigterm_as_ctrl_c():
        stops.note()  # what the handler does before the KeyboardInterrupt a library swallowed
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            distributed.Dist(rank=0, world_size=2).barrier()
        assert time.monotonic() - start < 5
    assert not stops.noted()  # forgotten with the command
    monkeypatch.setattr(distributed, "PEER_LOST_GRACE_S", 0.2)
    with sigterm_as_ctrl_c(), pytest.raises(RuntimeError, match="Connection closed by peer"):
        distributed.Dist(rank=0, world_size=2).barrier()


def test_a_sharded_generation_asks_should_stop_about_the_callers_own_context_index():
    """`Scorer.generate` calls `should_stop(i, tokens)` with i the index of the context in the caller's list; under data
    parallelism (`ShardedScorer`) rank 1 scores contexts 1, 3, ... and its scorer asked about 0, 1, ...: a long-context
    task whose stop rule depends on the request (its own stop string, its own answer length) stopped by another's."""
    from harness.quality.distributed import ShardedScorer
    from harness.quality.scoring import KVTally

    class Inner:
        def __init__(self):
            self.tally, self.batch_size = KVTally(), 4

        def generate(self, contexts, max_new_tokens, should_stop=None, progress=False):
            return [[j] if should_stop(j, [0]) else [] for j in range(len(contexts))]

    class Rank1(Dist):
        def all_gather_object(self, obj):
            return [([0, 2, 4], [[0], [2], [4]], KVTally().as_dict()), obj]  # rank 0's part, as its scorer would give it

    asked = []
    wants = {1: True, 3: False}  # per context index of the caller: stop context 1 at once, let 3 run

    def should_stop(i, tokens):
        asked.append(i)
        return wants[i]

    out = ShardedScorer(Inner(), Rank1(1, 2, 1)).generate([[7], [8], [9], [10], [11]], 4, should_stop)
    assert sorted(asked) == [1, 3]
    assert out[1] == [0] and out[3] == []
