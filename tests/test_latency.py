"""Latency runner on the tiny model: sample counts, percentiles, units, page rounding, bandwidth model."""

import json
import math

import pytest
import torch

from harness.latency import measure as latency
from harness.pd.engine import expected_kv_bytes
from harness.pd.kv import get_policy, policy_names
from harness.pd.plan import KVPolicy, PruningPlan


def test_percentiles_match_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert latency.percentile(xs, 50) == 3.0
    assert latency.percentile(xs, 90) == pytest.approx(4.6)
    assert latency.percentile(xs, 99) == pytest.approx(4.96)
    assert latency.percentile([7.0], 99) == 7.0
    s = latency.summarize("itl_ms", xs)
    assert set(s) == {"itl_ms_p50", "itl_ms_p90", "itl_ms_p99", "itl_ms_mean"} and s["itl_ms_mean"] == 3.0
    with pytest.raises(ValueError):
        latency.percentile([], 50)


def test_bandwidth_model_and_e2e():
    # 1 GB over 100 Gbit/s is 80 ms; E2E adds TTFT and (n - 1) decode steps
    assert latency.transfer_ms(10**9, 100) == pytest.approx(80.0)
    assert latency.transfer_ms(0, 25) == 0
    assert latency.e2e_ms(ttft=10.0, transfer=80.0, tpot=2.0, decode_tokens=5) == pytest.approx(98.0)
    with pytest.raises(ValueError):
        latency.transfer_ms(1, 0)


@pytest.mark.parametrize("batch", [1, 3])
def test_measure_counts_samples_and_bytes(tiny, batch):
    model = tiny.model
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 2, 3), kv_policy=KVPolicy(4, 8, (3,)))
    w = latency.Workload(prompt_tokens=37, decode_tokens=6, batch_size=batch)
    m = latency.measure(model, plan, w, warmup=1, repeats=4)
    assert m.clock == "perf_counter_ns"
    assert len(m.ttft_ms) == len(m.handoff_ms) == len(m.tpot_ms) == 4
    assert len(m.itl_ms) == 4 * (6 - 1)
    assert all(x > 0 for x in m.ttft_ms + m.itl_ms + m.handoff_ms)
    for r in range(4):
        assert m.tpot_ms[r] == pytest.approx(sum(m.itl_ms[5 * r : 5 * r + 5]) / 5)
    # layers 0 and 2 send all 37 positions, layer 3 sends 4 + 8
    per_layer_tok = expected_kv_bytes(model.config, 1, 1, next(model.parameters()).dtype)
    assert m.kv_bytes == batch * (2 * 37 + 12) * per_layer_tok
    # pages of 16 tokens per request and layer: 37 -> 48, 12 -> 16
    assert m.kv_bytes_paged == batch * (2 * 48 + 16) * per_layer_tok
    f = m.figures(bandwidths_gbit=(25, 400))
    assert f["transfer_ms@25gbit"] == pytest.approx(m.kv_bytes_paged * 8 / 25e9 * 1e3)
    assert f["e2e_ms_p50@400gbit"] == pytest.approx(f["ttft_ms_p50"] + f["transfer_ms@400gbit"] + 5 * _median(m.tpot_ms))
    assert all(k.endswith(("_ms_p50", "_ms_p90", "_ms_p99", "_ms_mean")) or "@" in k for k in f)  # bytes live in `kv`
    assert "decode_bound_ms" not in f and "real_transfer_recv_ms" not in f  # no such inputs given


def test_the_documented_figure_plugs_in(tiny, monkeypatch):
    """docs/adding.md's example figure, registered as written (a whole file: copied into a plug-in module, it imports
    what it uses), reaches the figures and summary.csv."""
    import re
    import statistics

    from conftest import ROOT

    from harness.latency import figures
    from harness.store import records
    from harness.store.latency import WorkloadLatency

    doc = (ROOT / "docs" / "adding.md").read_text().split("## A latency figure", 1)[1]
    code = re.search(r"```python\n(.*?)```", doc, re.S)[1]
    monkeypatch.setattr(figures, "FIGURES", dict(figures.FIGURES))  # the registration is undone after the test
    exec(code, {"__name__": "my_plugins.figures"})  # a whole file, its imports its own, as a plug-in module copies it
    m = latency.measure(tiny.model, PruningPlan.dense("u", 4), latency.Workload(16, 4, 2), warmup=0, repeats=3)
    f = m.figures(decode_bound_ms=2.5)
    assert f["decode_tok_per_s"] == pytest.approx(2 * 1e3 / statistics.median(m.tpot_ms)) and f["decode_bound_ms"] == 2.5
    one_token = latency.measure(tiny.model, PruningPlan.dense("u", 4), latency.Workload(16, 1, 1), warmup=0, repeats=1)
    assert "decode_tok_per_s" not in one_token.figures()
    r = records.RunRecord.from_dict(json.loads((ROOT / "results" / "reference" / "latency" / "unpruned__disaggregated.json").read_text()))
    r.latency["latency_T16_n4_b2"] = WorkloadLatency(f, m.to_dict())
    assert [row["value"] for row in records.summary_rows([r]) if row["metric"] == "decode_tok_per_s"] == [f["decode_tok_per_s"]]
    with pytest.raises(ValueError, match="registered twice"):
        figures.figure("ttft_ms")(lambda x: {})
    figures.FIGURES["bad_ms"] = lambda x: {"other_ms": 1.0}
    with pytest.raises(ValueError, match="'bad_ms' returned \\['other_ms'\\]"):
        m.figures()


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def test_measurement_serialises_without_copying_the_handoff(tiny):
    """to_dict leaves the handoff alone (asdict deep-copied its KV tensors, GBs on a GPU, to drop them)."""
    class NoCopy:
        def __deepcopy__(self, memo):
            raise AssertionError("the handoff was copied")

    m = latency.measure(tiny.model, PruningPlan.dense("u", 4), latency.Workload(8, 3, 1), warmup=0, repeats=2)
    want = m.to_dict()
    m.handoff = NoCopy()
    d = m.to_dict()
    assert d == want and "handoff" not in d and d["workload"] == {"prompt_tokens": 8, "decode_tokens": 3, "batch_size": 1}
    assert len(d["itl_ms"]) == 4 and d["itl_ms"] is not m.itl_ms


def test_single_token_workload_has_no_decode_samples(tiny):
    m = latency.measure(tiny.model, PruningPlan.dense("u", 4), latency.Workload(16, 1, 1), warmup=0, repeats=2)
    assert m.itl_ms == [] and len(m.ttft_ms) == 2
    f = m.figures()
    assert "itl_ms_p50" not in f and math.isclose(f["e2e_ms_p50@100gbit"], f["ttft_ms_p50"] + f["transfer_ms@100gbit"])


def test_latency_cli_writes_records_and_replays_plans(tmp_path, cli):
    from harness.store import records

    out = tmp_path / "lat"
    args = ["latency", "--model", "random:tiny", "--device", "cpu", "-q", "--prompt-tokens", "40", "--decode-tokens", "4",
            "--batch-size", "1,2", "--repeats", "2", "--bandwidths", "10,100", "--decode-mode", "eager,static"]
    r = cli(*args, "--methods", "unpruned,manual", "--set", "manual.decode_layers=0,3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "prompt 40, decode 4, batch 2, eager decode" in r.stdout and "\n| manual | " in r.stdout
    assert "clock: perf_counter_ns" in r.stdout
    recs = {x.method: x for x in records.load_dir(out)}
    m = recs["manual"]
    assert m.scores == {} and "latency" not in m.extra  # figures are a typed field, not fake scores
    assert set(m.latency) == {"latency_T40_n4_b1", "latency_T40_n4_b2", "latency_T40_n4_b1_static", "latency_T40_n4_b2_static"}
    assert m.latency["latency_T40_n4_b1_static"].samples["decode_mode"] == "static"
    assert m.figure("latency_T40_n4_b1", "decode_bound_ms") > 0
    assert {"ttft_ms_p50", "tpot_ms_p99", "itl_ms_p90", "transfer_ms@10gbit", "e2e_ms_p50@100gbit"} <= set(m.latency["latency_T40_n4_b2"].figures)
    assert len(m.latency["latency_T40_n4_b2"].samples["itl_ms"]) == 2 * 3
    # a real two-process handoff of one workload (each one spawns two processes: one workload, not all eight)
    one = [x if x not in ("1,2", "eager,static") else {"1,2": "2", "eager,static": "eager"}[x] for x in args]
    # (the command in this process: the handoff's two processes are spawned all the same, one start-up fewer)
    rt = cli(*one, "--methods", "manual", "--set", "manual.decode_layers=0,3", "--out", str(tmp_path / "rt"), "--real-transfer")
    assert rt.returncode == 0, rt.stderr[-2000:]
    (moved_rec,) = records.load_dir(tmp_path / "rt")
    moved = moved_rec.latency["latency_T40_n4_b2"].samples["real_transfer"]
    assert moved_rec.figure("latency_T40_n4_b2", "real_transfer_recv_ms") == moved["recv_ms"]
    assert moved["kv_bytes_received"] == m.kv["latency_T40_n4_b2"]["kv_bytes"] and moved["backend"] == "gloo"
    assert moved["received_identical"] is True  # the tensors themselves, not only their byte count
    assert m.kv["latency_T40_n4_b2"]["kv_bytes"] * 2 == recs["unpruned"].kv["latency_T40_n4_b2"]["kv_bytes"]
    rows = (out / "summary.csv").read_text().splitlines()
    assert any(row.startswith("manual,disaggregated,latency_T40_n4_b1,ttft_ms_p50,") for row in rows)
    # replay: the manual plan, stored as a record, is applied by `manual` with the options it was made with; with
    # other options it would be labelled with options that did not make it (refused); `unpruned`'s record is not read
    other = cli(*args, "--methods", "manual", "--plans-from", str(out), "--out", str(tmp_path / "replay"))
    assert other.returncode == 2 and "manual's plan was made with other options (decode_layers=[0, 3] there, " in other.stderr
    r2 = cli(*args, "--methods", "manual", "--set", "manual.decode_layers=0,3", "--plans-from", str(out),
             "--out", str(tmp_path / "replay"))
    assert r2.returncode == 0, r2.stderr[-2000:]
    (rep,) = records.load_dir(tmp_path / "replay")
    assert "prompt 40, decode 4, batch 1, static decode" in r2.stdout and "\n| manual | " in r2.stdout
    assert rep.plan["decode_layers"] == [0, 3] and rep.extra["plan_source"]["replayed_from"] == str(out.resolve())
    alien = json.loads((out / "manual__disaggregated.json").read_text())  # a plug-in's record, plug-in not loaded
    alien.update(method="plugin_kv", run_key="plugin_kv-key")
    alien["plan"]["kv_policy"] = {"kind": "not_loaded", "budget": {"tokens": 4}}
    (out / "plugin_kv__disaggregated.json").write_text(json.dumps(alien))
    r3 = cli(*args, "--methods", "manual", "--set", "manual.decode_layers=0,3", "--plans-from", str(out),
             "--out", str(tmp_path / "replay3"))
    assert r3.returncode == 0, r3.stderr[-2000:]
    bad = cli(*args, "--methods", "manual", "--plans-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "not a folder of run records" in bad.stderr
    bad = cli(*args, "--methods", "manual", "--plans-from", "nowhere", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--plans-from nowhere: not a folder of run records (relative paths are read from " \
        "the current folder, " in bad.stderr
    assert not (tmp_path / "x").exists()  # refused before the output folder was made
    bad = cli(*args[:-2], "--decode-mode", "turbo", "--out", str(tmp_path / "y"))
    assert bad.returncode == 2 and "--decode-mode turbo: expected any of eager, static, graph" in bad.stderr


def test_latency_plans_from_replays_a_swept_variants_plan(cli, tmp_path, data_dir):
    """`latency --methods tail --set tail.k=1 --plans-from RUN` planned afresh beside the very plan it asked for,
    stored by a depth sweep as `tail@k=1__disaggregated.json` (a quality run's --plans-from finds it): for PDTrim, the
    whole search again, on random weights, under the replayed plan's name. The variant with the same options is
    replayed; with options no variant has, the method plans afresh and says so."""
    from harness.store import records

    run = tmp_path / "q"
    assert cli("--model", "random:tiny", "--device", "cpu", "--methods", "tail", "--set", "tail.k=1,2", "--tasks",
               "arc_easy", "--limit", "2", "--mode", "disaggregated", "--out", run, data_dir=data_dir).returncode == 0
    lat = ("latency", "--model", "random:tiny", "--device", "cpu", "--methods", "tail", "--prompt-tokens", "16",
           "--decode-tokens", "2", "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--plans-from", run, "-q")
    for k in (1, 2):
        r = cli(*lat, "--set", f"tail.k={k}", "--out", tmp_path / f"lat{k}")
        assert r.returncode == 0 and "planning afresh" not in r.stderr, r.stderr[-1500:]
        (rec,) = records.load_dir(tmp_path / f"lat{k}")
        stored = records.load(run / f"tail@k={k}__disaggregated.json")
        assert rec.method == rec.plan["method"] == "tail" and rec.extra["plan_source"]["replayed_from"] == str(run.resolve())
        assert rec.plan["removed_decode"] == stored.plan["removed_decode"] and len(rec.plan["removed_decode"]) == k
    r = cli(*lat, "--set", "tail.k=3", "--out", tmp_path / "lat3")
    assert r.returncode == 0 and "tail: no disaggregated plan to replay in --plans-from" in r.stderr


def test_a_data_dir_that_is_no_folder_is_refused_only_for_a_method_that_plans_here(cli, tmp_path, data_dir):
    """`--data-dir` (or HARNESS_DATA_DIR) naming no folder, on a machine that only times plans: `latency --plans-from RUN`
    of a calibrating method whose plan RUN holds needs no data, and was refused ("no such directory") all the same. A
    method whose plan is not replayed, and so calibrates here, is still refused before the weights load."""
    run, opts = tmp_path / "q", ("--methods", "shortgpt", "--set", "shortgpt.k=1", "--set", "calib.n_samples=4")
    assert cli("--model", "random:tiny", "--device", "cpu", *opts, "--tasks", "arc_easy", "--limit", "2", "--mode",
               "disaggregated", "--out", run, data_dir=data_dir).returncode == 0
    lat = ("latency", "--model", "random:tiny", "--device", "cpu", "--prompt-tokens", "16", "--decode-tokens", "2",
           "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--plans-from", run, "--data-dir", tmp_path / "nodata", "-q")
    r = cli(*lat, *opts, "--out", tmp_path / "lat")
    assert r.returncode == 0 and "planning afresh" not in r.stderr, r.stderr[-1500:]
    r = cli(*lat, *opts, "--methods", "shortgpt,sleb", "--set", "sleb.k=1", "--out", tmp_path / "lat2")
    assert r.returncode == 2 and f"--data-dir {tmp_path / 'nodata'}: no such directory" in r.stderr, r.stderr[-1500:]
    assert "loaded" not in r.stderr and not (tmp_path / "lat2").exists()


def test_plans_are_measured_in_interleaved_rounds(tiny, monkeypatch):
    # another job's load changes from minute to minute: each round measures every plan once, so the
    # plans' fastest repeats (what the CI gate divides) sample the same stretches of load
    import methods
    from harness.run import latency_run

    calls, real = [], latency_run.measure
    def spy(model, plan, w, **kw):
        calls.append((plan.method, w.batch_size, kw["warmup"], kw["repeats"]))
        return real(model, plan, w, **kw)

    monkeypatch.setattr(latency_run, "measure", spy)
    cfg = latency_run.LatencyConfig(prompt_tokens=(12,), decode_tokens=(3,), batch_sizes=(1, 2), warmup=1, repeats=3)
    dense = PruningPlan("unpruned", 4, (0, 1, 2, 3), (0, 1, 2, 3))
    pruned = PruningPlan("manual", 4, (0, 1, 2, 3), (0, 3))
    todo = [("unpruned", methods.get("unpruned")(), dense), ("manual", methods.get("manual")(), pruned)]
    out = latency_run._measure_interleaved(cfg, tiny.model, todo, lambda msg: None)
    one_round = [(m, b) for m in ("unpruned", "manual") for b in (1, 2)]
    assert [c[:2] for c in calls] == one_round * 3
    assert [c[2:] for c in calls] == [(1, 1)] * 4 + [(0, 1)] * 8  # warm-up runs in the first round only
    m, moved = out["manual"]["latency_T12_n3_b2"]
    assert len(m.ttft_ms) == len(m.tpot_ms) == 3 and len(m.itl_ms) == 3 * 2 and moved is None
    assert m.handoff is None  # no KV tensors kept after the rounds
    assert 2 * m.kv_bytes == out["unpruned"]["latency_T12_n3_b2"][0].kv_bytes
    other = latency.measure(tiny.model, dense, m.workload, warmup=0, repeats=1)
    with pytest.raises(RuntimeError, match="the same handoff sent"):
        m.extend(other)  # another plan's bytes: not one plan's runs


def test_the_latency_rounds_say_an_eta(tiny, monkeypatch):
    """A latency run printed only `method: workload (round r/R)`: minutes of rounds (an 8B shape at 8192 tokens)
    with no ETA. After the first round each line says how long the rest takes, at each run's last time."""
    import methods
    from harness.run import latency_run

    now, real = [0.0], latency_run.measure

    def one_second_a_run(model, plan, w, **kw):  # a fake clock: every run, warm-up or measured, takes 1 s
        now[0] += kw["warmup"] + kw["repeats"]
        return real(model, plan, w, **kw)

    monkeypatch.setattr(latency_run, "measure", one_second_a_run)
    monkeypatch.setattr(latency_run, "perf_counter", lambda: now[0])
    said: list[str] = []
    cfg = latency_run.LatencyConfig(prompt_tokens=(12,), decode_tokens=(2,), batch_sizes=(1, 2), warmup=1, repeats=3)
    dense = PruningPlan("unpruned", 4, (0, 1, 2, 3), (0, 1, 2, 3))
    latency_run._measure_interleaved(cfg, tiny.model, [("unpruned", methods.get("unpruned")(), dense)], said.append)
    assert said[:2] == ["unpruned: latency_T12_n2_b1 (round 1/3) · ETA after the first round",
                        "unpruned: latency_T12_n2_b2 (round 1/3) · ETA after the first round"]
    assert said[2:] == [f"unpruned: latency_T12_n2_b{b} (round {r}/3) · ETA {eta}"  # 1 s a run once warm-ups are out
                        for r, b, eta in [(2, 1, "4.0 s"), (2, 2, "3.0 s"), (3, 1, "2.0 s"), (3, 2, "1.0 s")]]


def test_the_latency_eta_counts_the_real_handoffs_of_the_last_round(tiny, monkeypatch):
    """`--real-transfer` moves each plan and workload's handoff between two processes in the last round (a process
    starts each time: seconds); the ETA left them out and ran out while they went on. Before one is timed the line
    says they come on top; after, it counts each one left at their mean time."""
    import methods
    from harness.run import latency_run

    now, real = [0.0], latency_run.measure

    def one_second_a_run(model, plan, w, **kw):  # a fake clock: every run takes 1 s, every handoff moved 5 s
        now[0] += kw["warmup"] + kw["repeats"]
        return real(model, plan, w, **kw)

    def five_seconds(m, what):
        now[0] += 5
        return {"kv_bytes_received": m.kv_bytes}

    monkeypatch.setattr(latency_run, "measure", one_second_a_run)
    monkeypatch.setattr(latency_run, "_real_transfer", five_seconds)
    monkeypatch.setattr(latency_run, "perf_counter", lambda: now[0])
    said: list[str] = []
    cfg = latency_run.LatencyConfig(prompt_tokens=(12,), decode_tokens=(2,), batch_sizes=(1, 2), warmup=1, repeats=3,
                                    real_transfer=True)
    dense = PruningPlan("unpruned", 4, (0, 1, 2, 3), (0, 1, 2, 3))
    latency_run._measure_interleaved(cfg, tiny.model, [("unpruned", methods.get("unpruned")(), dense)], said.append)
    assert [line.split(" · ")[1] for line in said[2:]] == [
        "ETA 4.0 s + 2 handoffs between processes", "ETA 3.0 s + 2 handoffs between processes",
        "ETA 2.0 s + 2 handoffs between processes", "ETA 6.0 s"]  # the last: 1 s to measure, 5 s to move


def test_two_process_transfer_receives_exactly_the_counted_bytes(tiny):
    import torch

    from harness.latency.transfer import transfer_between_processes
    from harness.pd.cache import PDCache
    from harness.pd.engine import make_handoff, run_layers

    model = tiny.model
    plan = PruningPlan("x", 4, (0, 1, 3), (0, 3), kv_policy=KVPolicy(2, 5, (3,)))
    ids = torch.randint(0, 256, (2, 30))
    lengths = torch.tensor([30, 21])
    pos = torch.arange(30)[None].expand(2, 30)
    cache = PDCache(retain=plan.decode_layers)
    with torch.inference_mode():
        run_layers(model, plan.prefill_layers, ids, pos, pos < lengths[:, None], cache)
    sent = make_handoff(cache, plan, lengths)
    got = transfer_between_processes(sent)
    assert got["kv_bytes_received"] == sent.kv_bytes == (30 + 21 + 7 + 7) * 2 * 2 * 16 * 4
    assert got["recv_ms"] > 0 and got["metadata_bytes_received"] > 0
    rec = got["received"]
    for layer in sent.keys:
        assert torch.equal(rec.keys[layer], sent.keys[layer]) and torch.equal(rec.values[layer], sent.values[layer])
        assert torch.equal(rec.positions[layer], sent.positions[layer]) and torch.equal(rec.counts[layer], sent.counts[layer])
    from harness.latency.transfer import handoffs_equal

    assert handoffs_equal(rec, sent)
    rec.values[3] = rec.values[3].clone()
    rec.values[3].view(-1)[0] += 1  # one number of one layer's V: same bytes, other contents
    assert not handoffs_equal(rec, sent)


def test_a_real_transfer_that_delivers_other_tensors_fails(tiny, monkeypatch):
    """Bytes received = bytes counted cannot see corrupted contents; the run compares the tensors too."""
    import copy
    from types import SimpleNamespace

    from harness.latency import transfer
    from harness.pd.cache import PDCache
    from harness.pd.engine import make_handoff, run_layers
    from harness.run.latency_run import _real_transfer

    model = tiny.model
    plan = PruningPlan("x", 4, (0, 1, 3), (0, 3), kv_policy=KVPolicy(2, 5, (3,)))
    ids, lengths = torch.randint(0, 256, (1, 20)), torch.tensor([20])
    pos = torch.arange(20)[None]
    cache = PDCache(retain=plan.decode_layers)
    with torch.inference_mode():
        run_layers(model, plan.prefill_layers, ids, pos, pos < lengths[:, None], cache)
    sent = make_handoff(cache, plan, lengths)
    m = SimpleNamespace(clock="perf_counter_ns", handoff=sent, kv_bytes=sent.kv_bytes)
    bad = copy.deepcopy(sent)
    bad.keys[0] = bad.keys[0] + 1
    fake = {"kv_bytes_received": sent.kv_bytes, "metadata_bytes_received": 1, "recv_ms": 1.0}
    monkeypatch.setattr(transfer, "transfer_between_processes", lambda h, backend: {**fake, "received": copy.deepcopy(sent)})
    assert _real_transfer(m, "x")["received_identical"] is True
    monkeypatch.setattr(transfer, "transfer_between_processes", lambda h, backend: {**fake, "received": bad})
    with pytest.raises(RuntimeError, match="received other KV tensors than the prefill process sent"):
        _real_transfer(m, "x")


def test_real_transfer_backend_per_device():
    """--real-transfer: gloo on CPU; NCCL only across two GPUs (it refuses two ranks on one GPU), else CUDA IPC."""
    from harness.latency.transfer import transfer_backend

    assert transfer_backend("perf_counter_ns", 0) == "gloo"
    assert transfer_backend("cuda_events", 1) == "cuda_ipc" and transfer_backend("cuda_events", 2) == "nccl"


def test_cuda_timing_and_syncs_act_on_the_measured_device_not_the_current_one(monkeypatch, tmp_path):
    """A CUDA event records on the current device's stream (torch.cuda.Event.record: `current_stream()` when none is
    given) and a bare torch.cuda.synchronize() waits for the current device: with the model on cuda:1 the clock timed
    an idle cuda:0, and the shared handoff's receiver released the sender's memory before its copies ended. Emulated
    with a fake current device: the events are recorded, and the syncs made, with cuda:1 current."""
    import queue

    from harness.latency import transfer

    current = [0]  # the current CUDA device's index

    class Device:  # torch.cuda.device(d): d current inside
        def __init__(self, d):
            self.index = torch.device(d).index

        def __enter__(self):
            self.before, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.before

    recorded, synced = [], []

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            recorded.append(current[0])

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 1.5

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(
        current[0] if device is None else torch.device(device).index))
    out, ms = latency.Clock(torch.device("cuda", 1)).time(lambda: 7)
    assert (out, ms) == (7, 1.5) and recorded == [1, 1]

    msg, done = queue.Queue(), queue.Queue()
    msg.put({"n_requests": 1, "t0_ns": 0, "items": [("k", 0, torch.zeros(2, 1, 4)), ("v", 0, torch.zeros(2, 1, 4)),
                                                      ("pos", 0, torch.arange(2)), ("cnt", 0, torch.tensor([2]))]})
    transfer._shared_receiver("cuda:1", msg, done, str(tmp_path / "got.json"))
    assert synced == [1] and done.get_nowait() is True


def test_the_shared_handoff_is_timed_from_a_running_decode_process(tmp_path):
    """transfer_shared's handoff_ms runs from the sender's put to the receiver's last copy: the sender puts once the
    receiver says it is up. Before, it put as soon as its own tensors were ready, and the clock took in the receiver's
    start: on a GPU always its CUDA context, made when the first IPC handle was unpickled (torch.multiprocessing's
    rebuild_cuda_tensor calls torch.cuda._lazy_init), a fixed cost that is no part of the handoff. Emulated in
    threads with a receiver 0.5 s late."""
    import queue
    import threading
    import time

    from harness.latency import transfer
    from harness.pd.engine import Handoff

    one = {0: torch.zeros(2, 1, 4)}
    torch.save(Handoff(one, one, {0: torch.arange(2)}, {0: torch.tensor([2])}, n_requests=1), tmp_path / "h.pt")
    msg, done, ready = queue.Queue(), queue.Queue(), queue.Queue()

    def late_receiver():
        time.sleep(0.5)  # a decode process still importing torch, making its CUDA context
        transfer._shared_receiver("cpu", msg, done, str(tmp_path / "got.json"), ready)

    threads = [threading.Thread(target=transfer._shared_sender, args=(str(tmp_path / "h.pt"), "cpu", msg, done, ready), daemon=True),
               threading.Thread(target=late_receiver, daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    got = json.loads((tmp_path / "got.json").read_text())
    assert got["kv_bytes_received"] == 64 and got["handoff_ms"] < 250


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a device the sender cannot open")
def test_a_shared_handoff_whose_sender_fails_fails_at_once():
    """The receiver waits SHARED_TIMEOUT_S (180 s) for the sender's message: when the sender dies (here: no CUDA to
    move the tensors to; on a GPU, e.g. a refused CUDA IPC), the handoff fails at once instead of after it."""
    import time

    from harness.latency.transfer import transfer_shared
    from harness.pd.engine import Handoff

    one = {0: torch.zeros(2, 1, 4)}
    h = Handoff(one, one, {0: torch.arange(2)}, {0: torch.tensor([2])}, n_requests=1)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="shared-memory handoff failed: exit codes"):
        transfer_shared(h, "cuda")
    assert time.monotonic() - t0 < 90


def test_static_decode_path_generates_what_the_eager_path_generates(tiny):
    """Same greedy tokens and the same logits from the preallocated fixed-shape path as from the engine."""
    import torch

    from harness.pd.cache import PDCache
    from harness.pd.engine import final_logits, make_handoff, run_layers
    from harness.pd.static_decode import StaticKV, decode_step

    model = tiny.model
    plan = PruningPlan("x", 4, (0, 1, 3), (0, 3), kv_policy=KVPolicy(2, 5, (3,)))
    lengths = torch.tensor([30, 21])
    ids = torch.randint(0, 256, (2, 30))
    pos = torch.arange(30)[None].expand(2, 30)
    with torch.inference_mode():
        cache = PDCache(retain=plan.decode_layers)
        h = run_layers(model, plan.prefill_layers, ids, pos, pos < lengths[:, None], cache)
        tok0 = final_logits(model, h[torch.arange(2), lengths - 1]).argmax(-1)
        sent = make_handoff(cache, plan, lengths)
        eager_cache, skv = sent.to_cache(), StaticKV(sent.to_cache(), 6)
        te, ts, eager, static = tok0, tok0, [], []
        ones = torch.ones((2, 1), dtype=torch.bool)
        for step in range(6):
            p = (lengths + step)[:, None]
            he = run_layers(model, plan.decode_layers, te[:, None], p, ones, eager_cache)
            te = final_logits(model, he[:, 0]).argmax(-1)
            ts = decode_step(model, plan.decode_layers, ts[:, None], p, skv)
            skv.advance()
            eager.append(te)
            static.append(ts)
    assert all(torch.equal(a, b) for a, b in zip(eager, static))
    assert int(skv.step) == 6 and bool((skv.positions[3][1, :7 + 6] >= 0).all())  # 7 kept + 6 decoded columns


@pytest.mark.parametrize("mode", ["static", "eager"])
def test_measure_decode_modes_on_cpu(tiny, mode):
    w = latency.Workload(prompt_tokens=20, decode_tokens=5, batch_size=2)
    m = latency.measure(tiny.model, PruningPlan.dense("u", 4), w, warmup=0, repeats=2, decode_mode=mode)
    assert m.decode_mode == mode and len(m.itl_ms) == 2 * 4 and m.graph_capture_ms == []


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_measure_frees_a_runs_kv_before_the_next_prefill(tiny, monkeypatch, mode):
    """Each run's prefill cache, handoff and decode-side cache are gone when the next run prefills; only the last
    run's handoff stays (Measurement.handoff). Before, the previous run's three copies of the prompt KV were alive
    through the next run, and with the one it makes, five copies at once: for llama2-7b shapes (MHA) at batch 8
    and 2048 tokens that is 5 x 8 GiB beside 12.6 GiB of bf16 weights, over an H100's 79 GiB with what
    gpu_check's rows kept besides."""
    import weakref

    from harness.pd.stages import StagedModel

    made, alive_at_prefill = [], []
    prefill, handoff, receive = StagedModel.prefill, StagedModel.handoff, StagedModel.receive

    def spy_prefill(self, batch, **kw):
        alive_at_prefill.append(sum(r() is not None for r in made))  # no gc.collect(): freed by reference counts
        out = prefill(self, batch, **kw)
        made.append(weakref.ref(out.cache))
        return out

    def spy_handoff(self, out, rows=None):
        h = handoff(self, out, rows)
        made.append(weakref.ref(h))
        return h

    def spy_receive(sent):
        c = receive(sent)
        made.append(weakref.ref(c))
        return c

    monkeypatch.setattr(StagedModel, "prefill", spy_prefill)
    monkeypatch.setattr(StagedModel, "handoff", spy_handoff)
    monkeypatch.setattr(StagedModel, "receive", staticmethod(spy_receive))
    m = latency.measure(tiny.model, PruningPlan.dense("u", 4), latency.Workload(8, 3, 2), warmup=1, repeats=2, decode_mode=mode)
    assert alive_at_prefill == [0, 0, 0]
    assert m.handoff is not None and m.handoff is made[-2]() and m.kv_bytes == m.handoff.kv_bytes  # the last run's


def test_graph_mode_needs_cuda(tiny):
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        latency.measure(tiny.model, PruningPlan.dense("u", 4), latency.Workload(8, 3, 1), warmup=0, repeats=1, decode_mode="graph")


def test_decode_bound_inputs(tiny):
    import torch

    from harness.pd.static_decode import copy_bandwidth_bytes_per_s, weight_bytes

    model = tiny.model
    c = model.config
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    head = c.vocab_size * c.hidden_size * 4 + c.hidden_size * 4  # untied LM head + final norm
    assert weight_bytes(model, (0, 2)) == 2 * per_layer + head
    assert copy_bandwidth_bytes_per_s(torch.device("cpu"), nbytes=2**20, repeats=2) > 0


def _gpu_check(*args: str) -> int:
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check.main(list(args))


@pytest.mark.parametrize("flag,value,why", [("--repeats", "0", "expected a positive integer"),
                                            ("--warmup", "-1", "expected an integer >= 0")])
def test_gpu_check_refuses_counts_that_measure_nothing(tmp_path, capsys, flag, value, why):
    """--repeats 0 measured no run and crashed on the median of nothing, after the models were built on the device."""
    with pytest.raises(SystemExit) as e:
        _gpu_check(flag, value, "--json", str(tmp_path / "g.json"), "--md", str(tmp_path / "g.md"))
    assert e.value.code == 2 and f"argument {flag}: {why}" in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists()


def test_gpu_check_keeps_no_measured_kv_between_latency_rows(tmp_path, monkeypatch):
    """(b) compares each static/graph row's bytes with its eager row's, and (d) hands over one eager handoff: each
    row measured holds no earlier row's KV but that one. Before, every eager Measurement was kept (with its
    handoff) and the previous row's while the next was measured: on a GPU at batch 8, GBs of dead KV beside
    the row being measured (llama2-7b, dense: the eager row's 8 GiB and the static row's 8 GiB)."""
    import weakref

    from harness.latency import measure as lm

    real, handed, alive = lm.measure, [], []

    def spy(*a, **k):
        alive.append(sum(r() is not None for r in handed))  # handoffs of earlier rows still referenced
        m = real(*a, **k)
        handed.append(weakref.ref(m.handoff))
        return m

    monkeypatch.setattr(lm, "measure", spy)
    assert _gpu_check("--shapes", "tiny", "--sections", "b,d", "--prompt-tokens", "12", "--decode-tokens", "3", "--batch-sizes", "1,2",
                      "--device", "cpu", "--dtype", "float32", "--warmup", "0", "--repeats", "1",
                      "--json", str(tmp_path / "c.json"), "--md", str(tmp_path / "c.md")) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert len(alive) == len(res["latency"]) == 12 and all(x["kv_bytes_equal_eager"] for x in res["latency"])
    assert max(alive) <= 1  # the pdtrim-like eager handoff kept for (d)
    assert res["ipc_handoff"]["pass"]


class _Killed(BaseException):
    """What gpu_check's `attempt` does not catch: the process ends here (the device's time limit)."""


def _measure_until(monkeypatch, killed_at: int, failed_at: int | None = None) -> None:
    """`measure` as it is, but the `failed_at`-th call raises an out-of-memory error (a failed step) and the
    `killed_at`-th ends the process."""
    from harness.latency import measure as lm

    real, calls = lm.measure, []

    def spy(*a, **k):
        calls.append(k["decode_mode"])
        if len(calls) == failed_at:
            raise RuntimeError("out of memory")
        if len(calls) == killed_at:
            raise _Killed
        return real(*a, **k)

    monkeypatch.setattr(lm, "measure", spy)


def test_gpu_check_writes_every_latency_row_as_it_is_measured(tmp_path, monkeypatch):
    """The JSON and the table are rewritten after every (b) row and failed step, not once a shape's rows are all
    measured: a run killed by its time limit (or a crash of the process) mid-shape keeps the rows it measured."""
    _measure_until(monkeypatch, killed_at=4, failed_at=2)  # the second measurement a failed step, recorded
    out, md = tmp_path / "c.json", tmp_path / "c.md"
    with pytest.raises(_Killed):
        _gpu_check("--shapes", "tiny", "--sections", "b", "--prompt-tokens", "12", "--decode-tokens", "3", "--batch-sizes", "1,2",
                   "--device", "cpu", "--dtype", "float32", "--warmup", "0", "--repeats", "1", "--json", str(out), "--md", str(md))
    res = json.loads(out.read_text())
    assert [(x["plan"], x["batch"], x["decode_mode"]) for x in res["latency"]] == [("dense", 1, "eager"), ("dense", 2, "eager")]
    assert res["errors"] == [{"step": "latency tiny dense B=1 static", "error": "RuntimeError: out of memory"}]
    assert "| tiny | dense | 2 | eager |" in md.read_text() and "- latency tiny dense B=1 static: RuntimeError" in md.read_text()


def test_gpu_check_writes_the_bound_verdict_with_the_rows_it_judges(tmp_path, monkeypatch):
    """(c) is written with the (b) rows it is computed from: a run killed later in (b) (the device's time limit, in the
    second shape's rows) keeps the first shape's dense batch-1 verdict. It was computed once after all of (b), from
    inputs (weight bytes, ops per step) the JSON does not hold, so such a run lost it."""
    _measure_until(monkeypatch, killed_at=3)
    out = tmp_path / "c.json"
    with pytest.raises(_Killed):
        _gpu_check("--shapes", "tiny", "--sections", "b,c", "--prompt-tokens", "12", "--decode-tokens", "3", "--batch-sizes", "1",
                   "--device", "cpu", "--dtype", "float32", "--warmup", "0", "--repeats", "1", "--json", str(out), "--md", str(tmp_path / "c.md"))
    res = json.loads(out.read_text())
    assert [(x["plan"], x["decode_mode"]) for x in res["latency"]] == [("dense", "eager"), ("dense", "static")]
    bound = res["hbm_bound"]
    assert [(r["plan"], r["batch"]) for r in bound["rows"]] == [("dense", 1)] and bound["check"]["row"] == "tiny dense B=1"
    assert "## (c) static TPOT vs the HBM bound" in (tmp_path / "c.md").read_text()


def test_gpu_check_writes_each_agreement_row_as_it_is_measured(tmp_path, monkeypatch):
    """(a)'s rows are written plan by plan: a run killed in a shape's second plan keeps the first one's (on the GPU,
    llama3-8b's CPU reference is the longest step of the run)."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    class Killed(BaseException):
        pass

    real, calls = gpu_check.decode_paths, []

    def spy(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(gpu_check, "decode_paths", spy)
    out = tmp_path / "c.json"
    with pytest.raises(Killed):
        _gpu_check("--shapes", "tiny", "--sections", "a", "--agreement-context", "40", "--agreement-cont", "4", "--device", "cpu",
                   "--dtype", "float32", "--json", str(out), "--md", str(tmp_path / "c.md"))
    rows = json.loads(out.read_text())["agreement"]
    assert [r["plan"] for r in rows] == ["dense"] and rows[0]["pass"]


def test_a_failing_decode_path_keeps_the_agreement_rows(tmp_path, monkeypatch):
    """(a) checks the static (and, on a GPU, graph) decode path's tokens after the log-likelihood comparison: a path
    that fails (a refused graph capture) is recorded as a failed step and a False path, and the plans' rows, with
    their log-likelihoods and KV bytes, are kept. Before, the error ended the shape's agreement: both plans' rows,
    and the minutes of CPU reference behind them, were lost, for every shape."""
    from harness.latency import measure as lm

    real = lm.measure

    def spy(*a, **k):
        if k.get("decode_mode") == "static":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return real(*a, **k)

    monkeypatch.setattr(lm, "measure", spy)
    out = tmp_path / "c.json"
    assert _gpu_check("--shapes", "tiny", "--sections", "a", "--agreement-context", "40", "--agreement-cont", "4", "--device", "cpu",
                      "--dtype", "float32", "--json", str(out), "--md", str(tmp_path / "c.md")) == 1
    res = json.loads(out.read_text())
    assert [r["plan"] for r in res["agreement"]] == ["dense", "pdtrim-like"]
    for r in res["agreement"]:
        assert r["max_abs_diff"] <= 1e-3 and r["kv_identical"] and r["decode_paths_equal"] == {"static": False} and not r["pass"]
    assert [e["step"] for e in res["errors"]] == ["agreement tiny dense static decode path", "agreement tiny pdtrim-like static decode path"]
    assert "static **no**" in (tmp_path / "c.md").read_text()


def test_gpu_check_script_runs_on_cpu_with_a_tiny_shape(tmp_path):
    """benchmarks/gpu_check.py, every section on CPU: (a) fp32 against a float64 copy (and the static decode
    path's tokens against the eager path's), (b) eager and static
    rows with the eager bytes, (c) static TPOT against the bound (no verdict on CPU), (d) a handoff through
    shared memory between two processes; one JSON and one Markdown table."""
    import json

    out, md = tmp_path / "check.json", tmp_path / "check.md"
    assert _gpu_check("--shapes", "tiny", "--prompt-tokens", "40", "--decode-tokens", "4", "--batch-sizes", "1,2", "--device", "cpu",
                      "--dtype", "float32", "--repeats", "1", "--json", str(out), "--md", str(md)) == 0
    res = json.loads(out.read_text())
    rows = res["latency"]
    assert {(x["plan"], x["batch"], x["decode_mode"]) for x in rows} == {
        (p, b, m) for p in ("dense", "shortgpt-like", "pdtrim-like") for b in (1, 2) for m in ("eager", "static")}
    for x in rows:
        assert set(x["decode_layers"]) <= set(x["prefill_layers"]) and x["kv_bytes_equal_eager"] is True
        assert len(x["samples"]["itl_ms"]) == 3 and x["ttft_ms_p50"] > 0
    dense = next(x for x in rows if x["plan"] == "dense" and x["batch"] == 2)
    assert dense["kv_bytes"] == 2 * 40 * 4 * 2 * 2 * 16 * 4  # batch · T · layers · (K, V) · kv_heads · head_dim · fp32
    (a_dense, a_pd) = res["agreement"]
    for a in (a_dense, a_pd):
        assert a["pass"] and a["max_abs_diff"] <= 1e-3 and a["candidate"] == "cpu float64" and a["requests"] == 6
        assert a["kv_bytes_candidate"] == 2 * a["kv_bytes_reference"] > 0 and a["kv_identical"]
        assert a["decode_paths_equal"] == {"static": True}  # the static path decodes the eager path's tokens
    assert a_pd["kv_bytes_reference"] < a_dense["kv_bytes_reference"]  # the first/last policy dropped positions
    bound = res["hbm_bound"]
    assert bound["decode_mode"] == "static" and len(bound["rows"]) == 6 and all(r["bound_ms"] > 0 for r in bound["rows"])
    assert bound["check"]["pass"] is None and "no verdict" in bound["check"]["note"]
    ops = {r["plan"]: r["ops_per_step"] for r in bound["rows"]}  # what a graph of one step replays: fewer layers, fewer ops
    assert ops["dense"] > ops["shortgpt-like"] > 0 and ops["pdtrim-like"] > 0
    small = res["rates"]["small_op_s"]  # one tiny op's cost, eager on a CPU: the floor per op
    assert bound["small_op_s"] == small and 0 < small < 1e-3
    for r in bound["rows"]:
        assert r["us_per_op_over_bound"] == pytest.approx((r["tpot_ms_p50"] - r["bound_ms"]) * 1e3 / r["ops_per_step"])
        assert r["floor_ms"] == pytest.approx(r["ops_per_step"] * small * 1e3)
        assert r["tpot_over_expected"] == pytest.approx(r["tpot_ms_p50"] / (r["bound_ms"] + r["floor_ms"]))
    assert bound["check"]["tpot_over_expected"] == next(r["tpot_over_expected"] for r in bound["rows"]
                                                         if r["plan"] == "dense" and r["batch"] == 1)
    ipc = res["ipc_handoff"]
    pd_row = next(x for x in rows if x["plan"] == "pdtrim-like" and x["batch"] == 1 and x["decode_mode"] == "eager")
    assert ipc["backend"] == "shared_memory" and ipc["tensors_equal"] and ipc["pass"]
    assert ipc["kv_bytes_received"] == ipc["kv_bytes_counted"] == pd_row["kv_bytes"] and ipc["metadata_bytes_received"] > 0
    assert ipc["handoff_ms"] >= ipc["recv_ms"] > 0
    assert res["skipped"] == [{"step": "latency graph rows", "reason": "CUDA graphs need a CUDA device (static stands in)"}]
    assert res["estimate_s"] > 0 and res["rates"]["copy_bandwidth_bytes_per_s"] > 0 and "errors" not in res
    table = md.read_text()
    for head in ("## (a) PD engine agreement", "## (b) Latency per stage", "## (c) static TPOT vs the HBM bound",
                 "## (d) Handoff between two processes", "| tiny | pdtrim-like | 1 | static |", "| static yes | pass |"):
        assert head in table


def test_gpu_check_judges_graph_tpot_against_the_bound_plus_the_small_op_floor():
    """(c)'s verdict: TPOT ≤ 1.2 × (bound + ops × small-op floor), on a graph row only; no verdict without a floor."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import hbm_bound

    models = {"bound_mode": "graph", "weight_bytes": {("s", (0, 1)): 10**9}, "step_ops": {("s", "dense"): 1000},
              "kv_bytes_per_token": {"s": 0}}
    row = {"shape": "s", "plan": "dense", "batch": 1, "decode_mode": "graph", "decode_layers": [0, 1], "kv_bytes": 0,
           "samples": {"workload": {"decode_tokens": 2}}}
    # bound 1 ms (10^9 B at 10^12 B/s), floor 1000 × 2 µs = 2 ms: expected 3 ms
    for tpot, verdict in ((3.5, True), (3.7, False)):
        c = hbm_bound([row | {"tpot_ms_p50": tpot}], models, 1e12, "s", small_op_s=2e-6)["check"]
        assert c["tpot_over_bound"] == pytest.approx(tpot) and c["tpot_over_expected"] == pytest.approx(tpot / 3)
        assert c["pass"] is verdict
    c = hbm_bound([row | {"tpot_ms_p50": 3.5}], models, 1e12, "s", small_op_s=None)["check"]
    assert c["pass"] is None and "small-op floor" in c["note"]
    c = hbm_bound([row | {"tpot_ms_p50": 3.5, "decode_mode": "static"}], models | {"bound_mode": "static"}, 1e12, "s", 2e-6)["check"]
    assert c["pass"] is None and "on CPU the static path stands in" in c["note"]


def test_gpu_check_twin_has_the_weights_of_a_tied_model():
    """(a)'s CPU reference is a copy built empty and filled: SmolLM2's LM head is its embedding (tied)."""
    import sys

    import torch
    from conftest import ROOT
    from transformers import AutoModelForCausalLM

    from harness.pd.models import preset_config

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    # SmolLM2's shape and tied embedding with 2 of its 30 layers (the tie, not the depth, is the point; 30 took ~5 s)
    cfg = preset_config("smollm2-135m")
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    copy = gpu_check.twin(model, torch.device("cpu"), torch.float64)
    ids = torch.randint(0, 256, (1, 9))
    with torch.inference_mode():
        want, got = model(ids).logits.double(), copy(ids).logits
    assert got.dtype == torch.float64 and torch.allclose(got, want, atol=1e-4, rtol=0)
    assert torch.equal(copy.lm_head.weight, model.lm_head.weight.double())


def test_gpu_check_records_a_failing_step_and_runs_the_others(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    def refused(*args):
        raise RuntimeError("CUDA IPC refused")

    monkeypatch.setattr(gpu_check, "ipc_handoff", refused)
    out, md = tmp_path / "check.json", tmp_path / "check.md"
    assert gpu_check.main(["--shapes", "tiny", "--prompt-tokens", "12", "--decode-tokens", "2", "--batch-sizes", "1", "--device", "cpu",
                           "--dtype", "float32", "--repeats", "1", "--warmup", "0", "--sections", "b,d", "--json", str(out),
                           "--md", str(md)]) == 1
    res = json.loads(out.read_text())
    assert res["errors"] == [{"step": "ipc handoff", "error": "RuntimeError: CUDA IPC refused"}] and len(res["latency"]) == 6
    assert "## Failed steps" in md.read_text() and "# FAILED ipc handoff" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        gpu_check.main(["--shapes", "tiny,llama9", "--json", str(out)])
    assert bad.value.code == 2 and "unknown shape(s) llama9; known: " in capsys.readouterr().err


def test_gpu_check_budget_skips_what_would_overrun(tmp_path):
    """With no time to spend, every step is skipped with its reason, and JSON and table are still written."""
    import json

    out, md = tmp_path / "check.json", tmp_path / "check.md"
    assert _gpu_check("--shapes", "tiny", "--prompt-tokens", "40", "--decode-tokens", "4", "--batch-sizes", "1", "--device", "cpu",
                      "--dtype", "float32", "--budget-s", "0", "--json", str(out), "--md", str(md)) == 0
    res = json.loads(out.read_text())
    assert res["latency"] == [] and res["agreement"] == [] and res["ipc_handoff"] is None
    steps = {s["step"]: s["reason"] for s in res["skipped"]}
    assert "latency tiny dense B=1 eager" in steps and "agreement tiny" in steps and "(b)" in steps["ipc handoff"]
    assert steps["agreement tiny"].startswith("budget: ") and steps["agreement tiny"].endswith("> 0 s")
    assert "## Skipped" in md.read_text() and "- latency tiny pdtrim-like B=1 static: budget: " in md.read_text()


def _decode_modes():
    """Every decode mode; `graph` on a CUDA device where there is one, else on CPU tensors under simulated CUDA
    graphs (tests/simulated_cuda_graphs.py)."""
    return list(latency.DECODE_MODES)


def _handed(m):
    """Per decode layer, the original positions and per-request counts the measured handoff sent."""
    h = m.handoff
    return {layer: (h.positions[layer].tolist(), h.counts[layer].tolist()) for layer in h.keys}


@pytest.mark.parametrize("mode", _decode_modes())
@pytest.mark.parametrize("kind", policy_names())  # the registry: a new policy is covered with no edit
def test_every_decode_mode_hands_over_what_the_first_eager_prefill_does(tiny, kind, mode):
    """With warm-up and repeats, every run of every decode mode prefills the workload's prompts at
    positions 0 .. T-1, so the handoff sends the bytes and positions of one eager run, and decodes
    the same greedy tokens. Before
    StagedModel, the static/graph branch rebound the prefill's positions to the decode step's: from
    the second run on, first_last sent dense bytes and SnapKV's selection failed."""
    import contextlib

    from simulated_cuda_graphs import simulated_cuda_graphs

    model, graphs = tiny.model, contextlib.nullcontext()
    if mode == "graph" and torch.cuda.is_available():
        from harness.pd.models import load_model

        model = load_model("random:tiny", device="cuda", dtype="float32", seed=0).model
    elif mode == "graph":
        graphs = simulated_cuda_graphs()
    policy = get_policy(kind).example((0, 1, 3))
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 3), policy)
    w = latency.Workload(prompt_tokens=12, decode_tokens=4, batch_size=3)
    first = latency.measure(model, plan, w, warmup=0, repeats=1, decode_mode="eager")
    with graphs:
        m = latency.measure(model, plan, w, warmup=1, repeats=2, decode_mode=mode)
    assert len(m.tpot_ms) == 2 and m.decode_mode == mode
    dtype = next(model.parameters()).dtype
    assert m.kv_bytes == first.kv_bytes < expected_kv_bytes(model.config, 3, 12, dtype, batch=3)
    assert m.kv_bytes_paged == first.kv_bytes_paged
    assert _handed(m) == _handed(first)
    assert m.tokens.shape == (3, 4) and torch.equal(m.tokens, first.tokens)  # the same greedy tokens on every path


def test_a_model_over_several_gpus_is_timed_between_synchronisations_of_all_of_them(monkeypatch):
    """An event pair times one GPU's stream; a model spread over GPUs (`--device-map`) is timed by the host's clock
    between synchronisations of every GPU it computes on, and says so in the record's clock."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(str(d)))
    gpus = [torch.device("cuda:0"), torch.device("cuda:1")]
    clock = latency.Clock(gpus[0], gpus + [torch.device("cuda:1")])
    out, ms = clock.time(lambda: calls.append("fn") or 7)
    assert clock.name == "cuda_synchronize" and out == 7 and ms >= 0
    assert calls == ["cuda:0", "cuda:1", "fn", "cuda:0", "cuda:1"]
    assert latency.Clock(gpus[0], [gpus[0]]).name == "cuda_events" and latency.Clock(torch.device("cpu")).name == "perf_counter_ns"


def test_graph_decode_of_a_model_over_several_gpus_is_refused(tiny, monkeypatch):
    from harness.pd import arch

    monkeypatch.setattr(arch, "execution_devices", lambda model: [torch.device("cuda:0"), torch.device("cuda:1")])
    with pytest.raises(ValueError, match="captures one GPU's stream; the model is spread over 2 GPUs"):
        latency.measure(tiny.model, PruningPlan.dense("u", 4), latency.Workload(8, 2, 1), decode_mode="graph")


def test_execution_devices_of_a_placed_model(tiny, monkeypatch):
    """The inputs' device first, then each GPU of accelerate's device map; CPU- and disk-offloaded layers run on the
    inputs' device."""
    from harness.pd import arch

    model = tiny.model
    assert arch.execution_devices(model) == [torch.device("cpu")]
    monkeypatch.setattr(model, "hf_device_map", {"model.embed_tokens": 1, "model.layers.0": 1, "model.layers.1": 0,
                                                 "model.layers.2": "cpu", "model.layers.3": "disk"}, raising=False)
    monkeypatch.setattr(arch, "model_device", lambda m: torch.device("cuda:1"))
    assert arch.execution_devices(model) == [torch.device("cuda:1"), torch.device("cuda:0")]
    # a map given by hand: "cuda:N" strings and torch.device values, a CPU one among them (unequal to "cpu")
    monkeypatch.setattr(model, "hf_device_map", {"model.embed_tokens": "cuda:1", "model.layers.0": torch.device("cuda:2"),
                                                 "model.layers.1": torch.device("cpu"), "lm_head": "disk"}, raising=False)
    assert arch.execution_devices(model) == [torch.device("cuda:1"), torch.device("cuda:2")]


def test_static_decode_steps_run_without_autograd(tiny, monkeypatch):
    """The static (and graph) decode steps run under inference mode, as the eager ones: a step timed with
    autograd on records a graph through the KV buffers, so static TPOT was not the eager path's cost."""
    from harness.pd import static_decode

    seen, step = [], static_decode.decode_step

    def spy(model, layers, tok, pos, cache):
        out = step(model, layers, tok, pos, cache)
        seen.append((torch.is_grad_enabled(), cache.keys[layers[0]].requires_grad))
        return out

    monkeypatch.setattr(static_decode, "decode_step", spy)
    latency.measure(tiny.model, PruningPlan.dense("u", 4), latency.Workload(8, 4, 2), warmup=0, repeats=1, decode_mode="static")
    assert seen == [(False, False)] * 3


def test_the_timed_prefill_head_and_handoff_run_without_autograd(tiny, monkeypatch):
    """The prefill's final norm and LM head (part of TTFT) and the handoff's packing and unpacking run under
    inference mode too; before, only the layers' forward did, and TTFT timed autograd's bookkeeping of the head."""
    from harness.pd.stages import StagedModel

    seen = []

    def spying(f):
        def spy(self, *a, **k):
            seen.append(torch.is_grad_enabled())
            return f(self, *a, **k)
        return spy

    for name in ("logits", "handoff"):
        monkeypatch.setattr(StagedModel, name, spying(getattr(StagedModel, name)))
    latency.measure(tiny.model, PruningPlan.dense("u", 4), latency.Workload(8, 2, 1), warmup=0, repeats=1)
    assert seen and not any(seen)


def test_a_record_measured_on_another_kind_of_device_is_not_reused(tmp_path, cli):
    """`--device auto` names a CPU and a GPU alike: a folder measured on a GPU (a shared filesystem, committed
    results) was 'reused' by a run on a CPU, and its milliseconds were tabled beside the CPU's."""
    out = tmp_path / "lat"
    args = ["latency", "--model", "random:tiny", "-q", "--prompt-tokens", "8", "--decode-tokens", "2", "--batch-size", "1",
            "--repeats", "1", "--methods", "unpruned", "--out", str(out)]
    assert cli(*args).returncode == 0
    path = out / "unpruned__disaggregated.json"
    assert cli(*args).returncode == 0  # measured here: reused
    d = json.loads(path.read_text())
    d["environment"]["device"] = "cuda:0"
    path.write_text(json.dumps(d))
    r = cli(*args)
    assert r.returncode == 2 and "measured on cuda, and this run measures on cpu" in r.stderr, r.stderr[-2000:]
    assert json.loads(path.read_text()) == d  # kept, not overwritten


def test_a_record_of_another_placement_is_not_reused(tmp_path, cli):
    """`--device-map` is part of a latency record's identity, and the refusal names it; and the same flag places the
    model otherwise on another machine (`auto` spreads it over every GPU there is: one GPU's CUDA events, or two GPUs
    timed by the host's clock), so a record of another placement (modules per device) is not reused either."""
    out = tmp_path / "lat"
    args = ["latency", "--model", "random:tiny", "-q", "--prompt-tokens", "8", "--decode-tokens", "2", "--batch-size", "1",
            "--repeats", "1", "--methods", "unpruned", "--out", str(out)]
    assert cli(*args, "--device-map", "auto").returncode == 0
    r = cli(*args)
    assert r.returncode == 2 and "configuration: device_map='auto' there, None here" in r.stderr, r.stderr[-2000:]
    assert cli(*args, "--device-map", "auto").returncode == 0  # the same placement: reused
    path = out / "unpruned__disaggregated.json"
    d = json.loads(path.read_text())
    d["model"]["device_map"] = {"0": 4, "1": 4}  # as measured over two GPUs
    path.write_text(json.dumps(d))
    r = cli(*args, "--device-map", "auto")
    assert r.returncode == 2 and "placed {'0': 4, '1': 4} (modules per device), and this run places it {'cpu': 1}" in r.stderr, \
        r.stderr[-2000:]
    assert json.loads(path.read_text()) == d  # kept, not overwritten


def test_measured_decode_steps_continue_the_prompt_and_the_handoff_includes_unpacking(tiny, monkeypatch):
    """Decode step s of a T-token prompt feeds the token at position T + s - 1; the handoff time is packing plus
    unpacking (an unpack made 15 ms slower shows in every handoff sample)."""
    import time

    from harness.pd.stages import StagedModel

    fed, step, receive = [], StagedModel.step, StagedModel.receive

    def spy(self, cache, tokens, positions, valid=None):
        fed.append(positions.tolist())
        return step(self, cache, tokens, positions, valid)

    def slow_receive(sent):
        time.sleep(0.015)
        return receive(sent)

    monkeypatch.setattr(StagedModel, "step", spy)
    monkeypatch.setattr(StagedModel, "receive", staticmethod(slow_receive))
    m = latency.measure(tiny.model, PruningPlan.dense("u", 4), latency.Workload(9, 4, 2), warmup=0, repeats=2)
    assert fed == [[9, 9], [10, 10], [11, 11]] * 2
    assert len(m.handoff_ms) == 2 and all(x >= 15 for x in m.handoff_ms)


def test_each_stage_is_timed_on_its_own_in_milliseconds(tiny, monkeypatch):
    """A prefill made 200 ms slower shows in TTFT, a handoff (packing) made 200 ms slower in the handoff time, each as
    200-odd ms: a stage's time added to another's (TTFT + handoff) or a clock in other units (µs) fails. The fastest
    repeat bounds each from above (load only adds time)."""
    import time

    from harness.pd.stages import StagedModel

    def slower(fn):
        def wrapped(self, *args, **kwargs):
            time.sleep(0.2)
            return fn(self, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(StagedModel, "prefill", slower(StagedModel.prefill))
    monkeypatch.setattr(StagedModel, "handoff", slower(StagedModel.handoff))
    m = latency.measure(tiny.model, PruningPlan.dense("u", 4), latency.Workload(9, 3, 1), warmup=0, repeats=2)
    for stage in (m.ttft_ms, m.handoff_ms):
        assert len(stage) == 2 and all(x >= 200 for x in stage) and min(stage) < 400, (m.ttft_ms, m.handoff_ms)


def test_latency_plans_from_skips_another_cells_unreadable_record_as_a_quality_run_does(tmp_path, capsys):
    from harness.cli import main

    src = tmp_path / "run"
    src.mkdir()
    (src / "tail__disaggregated.json").write_text("{")  # another method's cell: not this run's to refuse
    argv = ["latency", "--model", "random:tiny", "--device", "cpu", "--methods", "unpruned", "--prompt-tokens", "8",
            "--decode-tokens", "2", "--batch-size", "1", "--repeats", "1", "--plans-from", str(src), "-q"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    (src / "unpruned__disaggregated.json").write_text("{")  # this run's own: refused, naming it
    assert main([*argv, "--out", str(tmp_path / "b")]) == 2
    assert "unpruned__disaggregated.json" in capsys.readouterr().err


def test_a_workload_beyond_the_models_context_is_measured_and_said(tmp_path, capsys):
    """A workload needing more positions than `max_position_embeddings` (random:tiny: 4096) was measured without a
    word, although no deployment of the model serves it: it is still measured (a layer's cost does not depend on
    the positions), and the run says which workloads exceed the context. One that just fits is not named."""
    from harness.cli import main
    from harness.latency.measure import Workload, beyond_context
    from harness.pd.presets import PRESETS

    config = type("C", (), {"max_position_embeddings": PRESETS["tiny"]["max_position_embeddings"]})()
    assert config.max_position_embeddings == 4096
    assert beyond_context([Workload(4096, 1, 1), Workload(4000, 97, 2)], config) is None  # 4096 positions each
    words = beyond_context([Workload(4096, 2, 1), Workload(4096, 2, 4), Workload(16, 2, 1)], config)
    assert words.startswith("2 workload(s) need more positions than the model's context of 4096 tokens "
                            "(prompt+decode 4096+2)"), words
    assert beyond_context([Workload(10**6, 2, 1)], object()) is None  # a config naming no context: nothing to say
    argv = ["latency", "--model", "random:tiny", "--device", "cpu", "--methods", "unpruned", "--prompt-tokens", "4096",
            "--decode-tokens", "2", "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: 1 workload(s) need more positions than the model's context of 4096 tokens (prompt+decode 4096+2)" in err
    assert (tmp_path / "a" / "unpruned__disaggregated.json").exists()


def test_a_prefill_that_cannot_fit_in_memory_is_refused_before_the_weights_load(tmp_path, capsys, monkeypatch):
    """`--prompt-tokens 100000000` on random:tiny ended, after the weights loaded, in the allocator's "can't allocate
    memory" (exit 1). A prefill of any plan holds the token ids (int64), the embeddings and one layer's K and V:
    random:tiny in fp32 520 B per token (8 + 64·4 + 2·2·16·4); a workload whose floor exceeds the memory free is
    refused with exit 2 naming both figures, before `load_model`; one that fits is measured."""
    import types

    import torch

    from harness.cli import main
    from harness.latency import memory
    from harness.pd import models

    config = models.model_config("random:tiny")
    assert memory.bytes_per_prompt_token(config, torch.float32) == 8 + 64 * 4 + 2 * 2 * 16 * 4 == 520
    assert memory.bytes_per_prompt_token(config, torch.bfloat16) == 8 + 64 * 2 + 2 * 2 * 16 * 2
    # a latent KV cache: the latent and the rotary key part per token and layer (kv_lora_rank + qk_rope_head_dim)
    latent = types.SimpleNamespace(hidden_size=64, num_attention_heads=4, kv_lora_rank=16, qk_rope_head_dim=8)
    assert memory.bytes_per_prompt_token(latent, torch.float32) == 8 + 64 * 4 + (16 + 8) * 4
    argv = ["latency", "--model", "random:tiny", "--device", "cpu", "--methods", "unpruned", "--decode-tokens", "2",
            "--batch-size", "1,2", "--repeats", "1", "--warmup", "0", "-q"]
    # 10^12 tokens: more than any host has, read from /proc/meminfo as the run reads it
    assert main([*argv, "--prompt-tokens", "1000000000000", "--out", str(tmp_path / "huge")]) == 2
    err = capsys.readouterr().err
    assert "--prompt-tokens 1000000000000 --batch-size 2: one prefill holds at least 1,040,000.0 GB" in err, err
    assert "2 x 1000000000000 tokens x 520 B" in err and "free on the host (MemAvailable + SwapFree)" in err, err
    monkeypatch.setattr(memory, "_host_free_bytes", lambda: (520 * 2 * 64, "the host"))  # 64 tokens at batch 2
    loaded = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    assert main([*argv, "--prompt-tokens", "16,65", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--prompt-tokens 65 --batch-size 2:" in err and "of at most 128 tokens" in err and "free on the host;" in err, err
    monkeypatch.setattr(models, "load_model", loaded)
    assert main([*argv, "--prompt-tokens", "16,64", "--out", str(tmp_path / "b")]) == 0  # 520 · 2 · 64 B: just fits
    assert (tmp_path / "b" / "unpruned__disaggregated.json").exists()


def test_the_memory_free_on_a_gpu_counts_what_this_process_has_cached(monkeypatch):
    """A `[run]` section before `[latency]` (`check`, `--config`) leaves the quality run's blocks in PyTorch's caching
    allocator: `mem_get_info` counts them as taken, though the prefill reuses them. The floor compared 1 GB free with
    a 6 GB prefill on a GPU whose 60 GB cache held nothing live, and refused a workload that fits."""
    import types

    from harness.latency import memory
    from harness.latency.measure import Workload

    gb = 10**9
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (1 * gb, 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i=None: 60 * gb)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i=None: 2 * gb)  # live tensors: not free
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu = torch.device("cuda:0")
    assert memory.free_bytes(gpu, spread=False)[0] == 59 * gb
    monkeypatch.setattr(memory, "_host_free_bytes", lambda: (3 * gb, "the host"))
    assert memory.free_bytes(gpu, spread=True)[0] == 2 * 59 * gb + 3 * gb
    config = types.SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    per_token = memory.bytes_per_prompt_token(config, torch.bfloat16)
    memory.refuse_unfit(config, [Workload(6 * gb // per_token, 1, 1)], torch.bfloat16, gpu)  # 6 GB: fits


def test_a_count_too_deep_for_the_model_is_refused_before_any_method_plans(cli, tmp_path, monkeypatch):
    """`--methods unpruned,pdtrim,tail --set tail.k=8` on 4 layers: tail was refused only after PDTrim's search (a
    minute on random:tiny). Every method's counts are checked against the depth in the model's config first: no
    method plans and no weights load (an 8B model's minutes)."""
    from harness.pd import models
    from methods.pdtrim.method import PDTrim

    planned = []
    monkeypatch.setattr(PDTrim, "plan", lambda self, model, calib, mode: planned.append(mode) or PruningPlan.dense("pdtrim", 4))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: planned.append("the weights loaded"))
    r = cli("latency", "--model", "random:tiny", "--device", "cpu", "--methods", "unpruned,pdtrim,tail", "--set", "tail.k=8",
            "--set", "pdtrim.k_prefill=1", "--set", "pdtrim.k_decode=2", "--prompt-tokens", "16", "--decode-tokens", "2",
            "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--out", tmp_path / "lat", "-q")
    assert r.returncode == 2 and "error: tail.k=8: must be < the model's 4 layers (at least one must stay); for 4 " \
        "layers try --set tail.k=2" in r.stderr, r.stderr[-2000:]
    assert planned == [] and "planning" not in r.stderr


def test_the_depth_check_before_planning_refuses_no_count_a_plugin_does_not_check():
    """A plug-in's option named k need not be a layer count (here a width): the check before planning leaves it to
    the plug-in's plan(); a check_depth of a plug-in that fails otherwise than with a UsageError is left to plan() too,
    where the failure is the plug-in's alone. One that refuses is refused before planning."""
    import dataclasses

    from harness.errors import UsageError
    from methods.base import Method, refuse_too_deep

    @dataclasses.dataclass(frozen=True)
    class Wide:
        k: int = 64  # a width

    class PdTestWide(Method):
        name, Config = "pd_test_wide", Wide

        def plan(self, model, calib, mode):
            return PruningPlan.dense(self.name, 4)

    class PdTestBroken(PdTestWide):
        def check_depth(self, n, mode):
            raise KeyError("a bug of the plug-in's check")

    class PdTestDeep(PdTestWide):
        def check_depth(self, n, mode):
            raise self.too_deep("k", self.config.k, n)

    refuse_too_deep({"pd_test_wide": PdTestWide(), "pd_test_broken": PdTestBroken()}, 4)
    with pytest.raises(UsageError, match=r"^pd_test_wide\.k=64: must be < the model's 4 layers"):
        refuse_too_deep({"pd_test_wide": PdTestWide(), "pd_test_deep": PdTestDeep()}, 4)


def test_plans_from_says_why_a_method_with_trained_state_plans_afresh(cli, tmp_path, monkeypatch):
    """streamline with replace=ffn has its record in --plans-from, but plans again (its trained FFN is in no record):
    the run said 'no disaggregated plan to replay in --plans-from', as if the record were missing."""
    from methods.depth.streamline import Streamline

    args = ("latency", "--model", "random:tiny", "--device", "cpu", "--prompt-tokens", "16", "--decode-tokens", "2",
            "--batch-size", "1", "--repeats", "1", "--warmup", "0", "-q")
    src = tmp_path / "src"
    assert cli(*args, "--methods", "tail", "--set", "tail.k=1", "--out", src).returncode == 0
    stored = json.loads((src / "tail__disaggregated.json").read_text())
    stored["method"] = stored["plan"]["method"] = "streamline"
    stored["config"]["method_options"] = {"k": 1, "replace": "ffn"}
    (src / "streamline__disaggregated.json").write_text(json.dumps(stored))
    monkeypatch.setattr(Streamline, "plan", lambda self, model, calib, mode: PruningPlan("streamline", 4, (0, 1, 2), (0, 1, 2)))
    r = cli(*args, "--methods", "streamline", "--set", "streamline.k=1", "--set", "streamline.replace=ffn",
            "--plans-from", src, "--out", tmp_path / "lat")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"streamline: its plan in --plans-from {src} is not replayed: it plans with trained state no record keeps; " \
           "planning afresh" in r.stderr and "no disaggregated plan to replay" not in r.stderr


@pytest.mark.parametrize("where", ["planning", "rounds"])
def test_ctrl_c_says_the_rounds_are_lost_only_when_they_were_measuring(cli, tmp_path, monkeypatch, where):
    """Ctrl-C during a method's planning (PDTrim's search: the long part, whose values the calibration cache keeps)
    said 'the rounds measured so far are not kept ... give fewer --repeats, workloads or methods', though no round had
    begun; it is said when the rounds are interrupted."""
    from harness.run import latency_run
    from methods.depth.tail import Tail

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(*((Tail, "plan", interrupt) if where == "planning" else (latency_run, "measure", interrupt)))
    r = cli("latency", "--model", "random:tiny", "--device", "cpu", "--methods", "tail", "--set", "tail.k=1",
            "--prompt-tokens", "16", "--decode-tokens", "2", "--batch-size", "1", "--repeats", "1", "--out", tmp_path / "lat")
    assert r.returncode == 130 and "interrupted (Ctrl-C)" in r.stderr, r.stderr[-2000:]
    assert ("the rounds measured so far are not kept" in r.stderr) == (where == "rounds")
