"""`--plans-from` for quality and latency runs with wrapped methods: a KV baseline's record made with
default options is reused (its stored options leave out policy options at their defaults), and a plan
that needs state its record lacks (streamline's trained FFN) is planned afresh, not a traceback."""

from __future__ import annotations

from harness.store import records

SNAPKV = ["--methods", "snapkv", "--set", "snapkv.base=tail", "--set", "snapkv.base_options=k=1"]
STREAMLINE = ["--methods", "streamline", "--set", "streamline.k=2", "--set", "streamline.replace=ffn",
              "--set", "streamline.replace_steps=2"]
LATENCY = ["latency", "--model", "random:tiny", "-q", "--prompt-tokens", "32", "--decode-tokens", "2", "--batch-size", "1",
           "--repeats", "1", "--warmup", "0"]


def _quality(cli, data_dir, out, method_args):
    r = cli("--model", "random:tiny", "--tasks", "arc_easy", "--limit", "2", "-q", *method_args, "--out", out,
            data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    (rec,) = records.load_dir(out)
    return rec


def test_a_kv_baseline_at_default_policy_options_is_replayed(cli, data_dir, tmp_path):
    first = _quality(cli, data_dir, tmp_path / "a", SNAPKV)
    assert "order" not in first.config["method_options"]  # at its dict default: left out of the stored options
    again = _quality(cli, data_dir, tmp_path / "b", SNAPKV + ["--plans-from", tmp_path / "a"])
    assert again.config["plan_reused_from"] == str(tmp_path / "a" / "snapkv__disaggregated.json")
    lat = cli(*LATENCY, *SNAPKV, "--plans-from", tmp_path / "a", "--out", tmp_path / "lat", data_dir=data_dir)
    assert lat.returncode == 0, lat.stderr[-2000:]
    (rec,) = records.load_dir(tmp_path / "lat")
    assert rec.extra["plan_source"] == {"replayed_from": str((tmp_path / "a").resolve())} and rec.plan == first.plan


def test_latency_plans_afresh_what_a_record_cannot_replay(cli, data_dir, tmp_path):
    first = _quality(cli, data_dir, tmp_path / "a", STREAMLINE)
    lat = cli(*LATENCY, *STREAMLINE, "--plans-from", tmp_path / "a", "--out", tmp_path / "lat", data_dir=data_dir)
    assert lat.returncode == 0, lat.stderr[-2000:]
    (rec,) = records.load_dir(tmp_path / "lat")
    assert rec.extra["plan_source"] == {"planned_on": "random:tiny"}  # the trained FFN is in no record
    assert rec.plan["removed_decode"] == first.plan["removed_decode"]


def test_a_sweep_variants_plan_is_reused_by_the_plain_method_and_back(cli, data_dir, tmp_path):
    swept = ["--methods", "tail", "--set", "tail.k=1,2"]
    r = cli("--model", "random:tiny", "--tasks", "arc_easy", "--limit", "2", "-q", *swept, "--out", tmp_path / "a",
            data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    one = _quality(cli, data_dir, tmp_path / "b", ["--methods", "tail", "--set", "tail.k=2", "--plans-from", tmp_path / "a"])
    assert one.config["plan_reused_from"] == str(tmp_path / "a" / "tail@k=2__disaggregated.json")
    assert one.plan["removed_decode"] == records.load(tmp_path / "a" / "tail@k=2__disaggregated.json").plan["removed_decode"]
    r = cli("--model", "random:tiny", "--tasks", "arc_easy", "--limit", "2", "-q", *swept, "--plans-from", tmp_path / "b",
            "--out", tmp_path / "c", data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    reused = {x.method: x.config["plan_reused_from"] for x in records.load_dir(tmp_path / "c")}
    assert reused == {"tail@k=1": None, "tail@k=2": str(tmp_path / "b" / "tail__disaggregated.json")}


def test_a_plans_from_without_a_matching_record_says_it_plans_afresh(cli, data_dir, tmp_path):
    """A --plans-from folder with no record to reuse (mistyped, a parent folder, other options) planned afresh in
    silence: for PDTrim minutes of search that the user meant to skip. The run now says so, and why."""
    (tmp_path / "empty").mkdir()
    r = cli("--model", "random:tiny", "--tasks", "arc_easy", "--limit", "2", "-q", "--methods", "tail", "--set", "tail.k=1",
            "--plans-from", tmp_path / "empty", "--out", tmp_path / "a", data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"tail/disaggregated: no plan to reuse in --plans-from {tmp_path / 'empty'} " \
           "(no record tail__disaggregated.json there); planning afresh" in r.stderr
    r = cli("--model", "random:tiny", "--tasks", "arc_easy", "--limit", "2", "-q", "--methods", "tail", "--set", "tail.k=2",
            "--plans-from", tmp_path / "a", "--out", tmp_path / "b", data_dir=data_dir)
    assert r.returncode == 0 and "(tail__disaggregated.json there was made with other tail options (k=1 there, 2 here)); " \
                                 "planning afresh" in r.stderr, r.stderr[-2000:]
    lat = cli(*LATENCY, "--methods", "tail", "--set", "tail.k=1", "--plans-from", tmp_path / "empty",
              "--out", tmp_path / "lat", data_dir=data_dir)
    assert lat.returncode == 0 and "tail: no disaggregated plan to replay in --plans-from" in lat.stderr, lat.stderr[-2000:]


def test_a_plans_from_record_for_another_depth_is_refused_as_bad_input(cli, data_dir, tmp_path):
    """A --plans-from record whose plan names another depth than the model's (edited by hand) failed the cell as a
    crash (exit 1, 'rerun to retry'), and a huge `n_layers` hung the run listing the removed layers. Now exit 2
    naming the file and both depths, before the plan is used."""
    first = _quality(cli, data_dir, tmp_path / "a", ["--methods", "tail", "--set", "tail.k=1"])
    path = tmp_path / "a" / first.filename
    edited = records.RunRecord.from_dict({**first.__dict__, "plan": {**first.plan, "n_layers": 8}})
    path.write_text(edited.to_json())
    r = cli("--model", "random:tiny", "--tasks", "arc_easy", "--limit", "2", "-q", "--methods", "tail", "--set", "tail.k=1",
            "--plans-from", tmp_path / "a", "--out", tmp_path / "b", data_dir=data_dir)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"--plans-from {path}: its plan is for a 8-layer model, this model has 4 layers" in r.stderr


def test_latency_plans_from_a_model_of_another_depth_says_which_model_would_replay_it(cli, data_dir, tmp_path):
    """`latency --plans-from` a run of another depth (a SmolLM2 run replayed on random:tiny) said only "--plans-from:
    tail's plan is for 30 layers, the model has 4": not which folder or file, nor what would be right. Now it names
    the record, the model it was made on, and the models of the plan's depth to give instead."""
    _quality(cli, data_dir, tmp_path / "a", ["--methods", "tail", "--set", "tail.k=1"])
    r = cli("latency", "--model", "random:smollm2-135m", "-q", "--prompt-tokens", "32", "--decode-tokens", "2",
            "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--methods", "tail", "--set", "tail.k=1",
            "--plans-from", tmp_path / "a", "--out", tmp_path / "lat", data_dir=data_dir)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"--plans-from {tmp_path / 'a'}: tail's plan ({tmp_path / 'a' / 'tail__disaggregated.json'}) is for a " \
           "4-layer model (random:tiny), this model has 30 layers; replay it on a 4-layer model (--model random:tiny), " \
           "or plan afresh without --plans-from" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_plans_from_a_run_of_another_model_or_seed_says_which(cli, data_dir, tmp_path):
    """A --plans-from folder of another model's (or seed's) run said only 'another model, seed, method options,
    calibration or code'; it now names what differs, as export's --plans-from does."""
    _quality(cli, data_dir, tmp_path / "a", ["--methods", "tail", "--set", "tail.k=1"])
    for flags, why in [(["--model", "random:smollm2-135m"], "--model random:tiny, not random:smollm2-135m"),
                       (["--model", "random:tiny", "--seed", "3"], "--seed 0, not 3")]:
        r = cli(*flags, "--tasks", "arc_easy", "--limit", "2", "-q", "--methods", "tail", "--set", "tail.k=1",
                "--plans-from", tmp_path / "a", "--out", tmp_path / flags[-1].replace(":", "_"), data_dir=data_dir)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"no plan to reuse in --plans-from {tmp_path / 'a'} (tail__disaggregated.json there was made with " \
               f"{why}); planning afresh" in r.stderr, r.stderr[-2000:]
