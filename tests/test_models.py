"""Model specs: a saved directory loads back to the same logits; random presets have the published shapes."""

import pytest
import torch

from harness.errors import UsageError
from harness.pd.models import PRESETS, load_model


def test_local_directory_roundtrip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), device="cpu", dtype="float32")
    ids = torch.randint(0, 256, (1, 9))
    with torch.inference_mode():
        assert torch.equal(again.model(ids).logits, tiny.model(ids).logits)
    assert again.description["kind"] == "directory" and again.tokenizer.encode("ab") == tiny.tokenizer.encode("ab")


def test_presets_shapes():
    assert PRESETS["llama3-8b"]["num_hidden_layers"] == 32 and PRESETS["llama3-8b"]["num_key_value_heads"] == 8
    assert PRESETS["smollm2-135m"]["num_attention_heads"] == 9 and PRESETS["smollm2-135m"]["num_key_value_heads"] == 3
    from harness.pd.models import preset_config

    qwen = preset_config("qwen2.5-7b")
    assert qwen.model_type == "qwen2" and (qwen.num_hidden_layers, qwen.num_key_value_heads, qwen.hidden_size) == (28, 4, 3584)
    small = load_model("random:smollm2-135m", device="cpu", dtype="bfloat16")
    assert small.model.config.num_hidden_layers == 30 and next(small.model.parameters()).dtype == torch.bfloat16


def test_smollm2_default_is_the_real_model(smollm2):
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (30, 9, 3, 49152)
    assert getattr(cfg, "quantization_config", None) is None  # dequantised, serialisable
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = smollm2.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, ids.shape[1]:])


def test_qwen2_architecture_runs_through_the_engine():
    """The Qwen2.5 preset's architecture (q/k/v bias) at a tiny width: both PD settings agree."""
    from transformers import AutoModelForCausalLM

    from harness.pd.models import preset_config
    from harness.pd.plan import PruningPlan
    from harness.quality.scoring import Scorer

    cfg = preset_config("qwen2.5-7b")
    cfg.update({"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 300})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    reqs = [(list(range(1, 30)), [3, 4, 5]), (list(range(7, 12)), [9])]
    plan = PruningPlan("x", 3, (0, 1, 2), (0, 2))
    uni = Scorer(model, PruningPlan.dense("u", 3), "unified", max_length=100).loglikelihood(reqs)
    dis = Scorer(model, PruningPlan.dense("u", 3), "disaggregated", max_length=100).loglikelihood(reqs)
    assert all(abs(a[0] - b[0]) < 1e-4 for a, b in zip(uni, dis))
    assert Scorer(model, plan, "disaggregated", max_length=100).loglikelihood(reqs)[0][0] != dis[0][0]


def test_sliding_window_models_are_refused_and_every_preset_has_full_attention():
    """The PD engine masks every layer causally over the whole prompt: a sliding-window model's scores would be
    silently wrong past its window (found with a Qwen2 of use_sliding_window=True: 0.17 off per request)."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    from harness.errors import UsageError
    from harness.pd.arch import check_full_attention
    from harness.pd.models import PRESETS, preset_config

    for cfg in (MistralConfig(), Gemma2Config(), Qwen2Config(use_sliding_window=True, max_window_layers=2, num_hidden_layers=4)):
        with pytest.raises(UsageError, match="sliding-window attention"):
            check_full_attention(cfg, "m")
    for cfg in (LlamaConfig(), Qwen2Config(), MistralConfig(sliding_window=None), *map(preset_config, PRESETS)):
        check_full_attention(cfg, "m")


def test_a_random_model_that_cannot_be_built_is_a_usage_error_naming_it(monkeypatch):
    """A build failure (a missing attention package, a placement that cannot be met) exits 2 naming the model and the
    error, not a traceback."""
    import harness.pd.models as models

    def broken(*a, **k):
        raise ImportError("some_attention_package is not installed")

    monkeypatch.setattr(models, "random_model", broken)
    with pytest.raises(UsageError, match=r"--model random:tiny: could not build it: ImportError: some_attention_package"):
        load_model("random:tiny", "cpu")


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3", "flex_attention"])
def test_attention_implementations_that_cannot_take_the_engine_masks_are_refused(impl):
    """flash attention sums the mask's last axis as a 2-D padding mask; the engine hands each layer (batch, heads, q,
    keys) masks for pruned KV, so a flash model scored wrongly or failed; flex wants a BlockMask."""
    from harness.pd.models import parse_model_args

    with pytest.raises(UsageError, match=rf"attn_implementation={impl}: not supported; .* only eager and sdpa take"):
        parse_model_args(f"attn_implementation={impl}")
    assert parse_model_args("attn_implementation=eager") == {"attn_implementation": "eager"}


def test_a_random_model_in_bfloat16_keeps_its_rotary_frequencies_in_float32():
    """As from_pretrained(dtype=bfloat16) leaves a real model (so a reloaded export scores the same)."""
    loaded = load_model("random:tiny", "cpu", "bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_a_near_miss_of_a_known_model_name_is_named_when_the_hub_fails(monkeypatch):
    """`--model smollm2` (for smollm2-135m) went to the hub and failed with the hub's connection error only."""
    from harness.errors import UsageError
    from harness.pd import models

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(models, "_from_pretrained", offline)
    monkeypatch.setattr(models.hub, "unreachable", lambda: None)  # the hub's name resolves; its load then fails
    with pytest.raises(UsageError, match=r"--model smollm2: could not load it: OSError: .*\(did you mean smollm2-135m\? "
                                         r"no hub access here\?"):
        load_model("smollm2", device="cpu")
    with pytest.raises(UsageError, match=r"\(did you mean random:tiny\? "):
        load_model("random-tiny", device="cpu")
    with pytest.raises(UsageError, match=r"could not load it: OSError: .*\(no hub access here\?"):
        load_model("gpt2", device="cpu")  # a real hub id, nothing like the harness's names


def _hub_host_unknown(monkeypatch):
    """No proxy, hub not offline, and the hub's host name fails to resolve, as on a machine with no network."""
    import socket

    from huggingface_hub import constants

    def no_dns(host, *a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def test_an_uncached_hub_id_with_no_hub_reachable_is_refused_at_once(monkeypatch):
    """A typo'd hub id with no network spent ~50 s in huggingface_hub's retries before any message."""
    from harness.errors import UsageError
    from harness.pd import models

    _hub_host_unknown(monkeypatch)
    monkeypatch.setattr(models, "_from_pretrained", lambda *a, **k: pytest.fail("went to from_pretrained"))
    monkeypatch.setattr(models.hub, "is_cached", lambda repo, revision=None: False)
    with pytest.raises(UsageError, match=r"--model HuggingFaceTB/SmolLM2-135M-Instrct: not in the local Hugging Face "
                                         r"cache, and the hub cannot be reached \(huggingface.co does not resolve: "):
        load_model("HuggingFaceTB/SmolLM2-135M-Instrct", device="cpu")


def test_a_cached_hub_id_with_no_hub_reachable_loads_from_the_cache_alone(monkeypatch, tmp_path):
    """Cached files load without the retries; `local_files_only` is not recorded in the model's args."""
    from huggingface_hub import constants

    from harness.pd import hub, models

    _hub_host_unknown(monkeypatch)
    snap = tmp_path / "models--org--m" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--org--m" / "refs").mkdir()
    (tmp_path / "models--org--m" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub.is_cached("org/m") and not hub.is_cached("org/other")
    calls = []

    def cached(path, dtype, device, placement=None, model_args=None, local_only=False):
        calls.append((path, model_args, local_only))
        return load_model("random:tiny", "cpu").model, None

    monkeypatch.setattr(models, "_from_pretrained", cached)
    loaded = load_model("org/m", device="cpu", model_args={"revision": "main"})
    assert calls == [("org/m", {"revision": "main"}, True)]
    assert loaded.description["model_args"] == {"revision": "main"}


def test_tokenizer_and_config_refuse_what_load_model_refuses_with_its_words(monkeypatch, tmp_path):
    """A run checks its options against the tokenizer and config before the weights load (`tokenizer_and_config`):
    a spec that names nothing loadable gets load_model's own message there, not another one, and no hub retries."""
    from harness.errors import UsageError
    from harness.pd import models

    _hub_host_unknown(monkeypatch)
    monkeypatch.setattr(models.hub, "is_cached", lambda repo, revision=None: False)
    (tmp_path / "no_config").mkdir()
    for spec in (str(tmp_path / "missing.gguf"), "./nowhere/at/all", str(tmp_path / "no_config"), "org/uncached",
                 "random:nope"):
        with pytest.raises(UsageError) as loading:
            load_model(spec, device="cpu")
        with pytest.raises(UsageError) as light:
            models.tokenizer_and_config(spec)
        assert str(light.value) == str(loading.value)


def test_tokenizer_and_config_of_a_model_folder_are_the_loaded_ones(tmp_path):
    """A saved model folder: the config and tokenizer read without the weights are those `load_model` gives."""
    from harness.pd import models

    saved = load_model("random:tiny", device="cpu")
    saved.model.save_pretrained(tmp_path)
    saved.tokenizer.save_pretrained(tmp_path)
    tok, config = models.tokenizer_and_config(str(tmp_path))
    loaded = load_model(str(tmp_path), device="cpu")
    assert config.to_dict() == loaded.model.config.to_dict()
    assert tok.encode("The pass key is 12345.") == loaded.tokenizer.encode("The pass key is 12345.")
    assert tok.chat_template == loaded.tokenizer.chat_template is not None


def test_tokenizer_and_config_of_the_default_model_are_the_loaded_ones(smollm2):
    """The default model (a GGUF file, converted once): its config and tokenizer without loading the weights."""
    from harness.pd import models

    tok, config = models.tokenizer_and_config("smollm2-135m")
    assert config.to_dict() == smollm2.model.config.to_dict()
    assert tok.encode("The pass key is 12345.") == smollm2.tokenizer.encode("The pass key is 12345.")
    assert tok.chat_template == smollm2.tokenizer.chat_template is not None


def test_the_hub_check_gives_no_verdict_behind_a_proxy_or_offline(monkeypatch):
    """A proxy may reach the hub when its name does not resolve here; HF_HUB_OFFLINE needs no retries."""
    from huggingface_hub import constants

    from harness.pd import hub

    _hub_host_unknown(monkeypatch)
    assert hub.unreachable().startswith("huggingface.co does not resolve: ")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub.unreachable() is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.unreachable() is None


@pytest.mark.parametrize("device", ["cudax", "cuda:abc", "cuda0", "CPU", "gpu"])
def test_a_misspelt_device_is_named_whatever_the_machine(device):
    """`cudax` and `cuda:abc` passed the startswith("cuda") check: on a GPU machine torch.device raised its own
    RuntimeError (a traceback); on a CPU one the message said CUDA is missing, not that the name is wrong."""
    from harness.errors import UsageError
    from harness.pd.models import resolve_device

    with pytest.raises(UsageError, match=r"expected auto, cpu or cuda\[:N\]"):
        resolve_device(device)


# -- architecture coverage: every family the load check lets through scores as its own forward -----------------------
