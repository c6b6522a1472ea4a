"""Long-context tasks: exact request construction, byte arithmetic per prompt length, both modes."""

import dataclasses
import math

import pytest

from harness.config import RunConfig
from harness.pd.plan import KVPolicy, PruningPlan
from harness.quality import long_tasks
from harness.quality.long_tasks import passkey, pd_ppl
from harness.quality.scoring import Scorer

PK = passkey.PasskeyConfig(lengths=(512, 1024), depths=(0.0, 0.5, 1.0), repeats=2, batch_size=4)
PPL = pd_ppl.PplConfig(prompt_tokens=(128, 256), cont_tokens=16, docs=3, batch_size=2)


def kv_bytes_per_token(model) -> int:
    """K and V, all kv heads, one layer, one position, in the model's dtype."""
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()


def test_passkey_samples_have_exact_lengths_keys_and_depths(tiny):
    tok = tiny.tokenizer
    samples = passkey.passkey_samples(tok, PK, None)
    assert len(samples) == 2 * 2 * 3
    assert samples == passkey.passkey_samples(tok, PK, None)  # deterministic
    assert len({s.key for s in samples}) == len(samples) and all(len(s.key) == 5 and s.key.isdigit() for s in samples)
    for s in samples:
        assert len(s.tokens) == s.length
        text = tok.decode(list(s.tokens))
        assert text.startswith("There is an important info") and text.endswith("What is the pass key? The pass key is")
        key_sentence = passkey.KEY.format(key=s.key)
        at = text.index(key_sentence)
        filler = len(text) - len(passkey.INTRO) - len(key_sentence) - len(passkey.QUESTION)
        rel = (at - len(passkey.INTRO)) / filler  # share of the filler that precedes the key
        assert abs(rel - s.depth) <= len(passkey.FILLER) / filler, (s.depth, rel)
    # depth 0 puts the key right after the intro; depth 1 right before the question
    first = next(s for s in samples if s.depth == 0.0)
    assert tok.decode(list(first.tokens)).index("The pass key is") < len(passkey.INTRO) + 2
    # --limit takes the grid round-robin: every length and depth is represented in the first 6
    lim = passkey.passkey_samples(tok, PK, 6)
    assert {(s.length, s.depth) for s in lim} == {(L, d) for L in PK.lengths for d in PK.depths}
    wide = dataclasses.replace(PK, lengths=(384, 400, 416), depths=(0.0, 0.25, 0.5, 0.75, 1.0), repeats=1)
    lim = passkey.passkey_samples(tok, wide, 4)  # fewer items than cells: every length, and distinct depths first
    assert {s.length for s in lim} == set(wide.lengths) and len({s.depth for s in lim}) == 3
    full = passkey.passkey_samples(tok, wide, None)
    assert [(s.length, s.depth) for s in full] == [(L, d) for L in wide.lengths for d in wide.depths]  # grid order
    assert [s for s in full if s.item_id in {x.item_id for x in lim}] == lim  # a limit keeps cells, in grid order
    assert len({s.item_id for s in passkey.passkey_samples(tok, PK, None)}) == len(PK.lengths) * len(PK.depths) * 2


def test_passkey_depths_typed_as_integers_draw_the_keys_of_their_floats(tiny):
    """Each key's RNG is seeded with the depth's text: `depths=(0, 1)` from Python drew other keys than the command
    line's (0.0, 1.0), while the item ids and options compared equal."""
    ints = passkey.passkey_samples(tiny.tokenizer, dataclasses.replace(PK, depths=(0, 1)), None)
    floats = passkey.passkey_samples(tiny.tokenizer, dataclasses.replace(PK, depths=(0.0, 1.0)), None)
    assert [(s.key, s.item_id) for s in ints] == [(s.key, s.item_id) for s in floats]


def test_passkey_scoring_takes_the_first_digit_run():
    assert passkey.passkey_correct(" 12345. Remember", "12345")
    assert not passkey.passkey_correct(" 123456", "12345")
    assert not passkey.passkey_correct(" the key", "12345")
    assert not passkey.passkey_correct(" 54321 12345", "12345")


def test_passkey_refuses_max_new_tokens_that_cannot_hold_a_key(tiny):
    """" 47778" is 6 tokens for SmolLM2's tokenizer (a space, then one per digit): 5 new tokens cut every key to
    4 digits, and a model that retrieved every key scored 0 %."""
    from harness.errors import UsageError

    assert len(tiny.tokenizer.encode(" 47778", add_special_tokens=False)) == 6
    short = dataclasses.replace(PK, max_new_tokens=5)
    with pytest.raises(UsageError, match=r"max_new_tokens=5 cannot hold a key.*passkey.max_new_tokens=6"):
        long_tasks.get("passkey").check_tokenizer(tiny.tokenizer, short, None)
    long_tasks.get("passkey").check_tokenizer(tiny.tokenizer, dataclasses.replace(PK, max_new_tokens=6), None)


def test_ppl_windows_are_the_same_articles_for_every_prompt_length(tiny, data_dir):
    windows = pd_ppl.ppl_windows(tiny.tokenizer, data_dir, PPL, None)
    assert len(windows) == 3 and all(len(w) == 256 + 16 for w in windows)
    assert pd_ppl.ppl_windows(tiny.tokenizer, data_dir, PPL, 2) == windows[:2]


@pytest.mark.parametrize("task", ["pd_ppl", "passkey"])
def test_long_task_bytes_match_arithmetic_and_modes_agree(tiny, data_dir, task):
    model, tok = tiny.model, tiny.tokenizer
    opts = PPL if task == "pd_ppl" else PK
    per_tok = kv_bytes_per_token(model)
    dense = PruningPlan.dense("unpruned", 4)
    pruned = PruningPlan("x", 4, (0, 1, 2, 3), (0, 2, 3), kv_policy=KVPolicy(4, 8, (2, 3)))
    outs = {}
    for name, plan, mode in [("uni", dense, "unified"), ("dis", dense, "disaggregated"), ("kv", pruned, "disaggregated")]:
        s = Scorer(model, plan, mode, max_length=4096, batch_size=16)
        outs[name] = long_tasks.evaluate(task, s, tok, data_dir, opts, None)
        if mode == "unified":
            assert s.tally.kv_bytes == 0
    assert outs["uni"]["scores"].keys() == outs["dis"]["scores"].keys()
    for m, v in outs["uni"]["scores"].items():
        assert math.isclose(v["value"], outs["dis"]["scores"][m]["value"], rel_tol=1e-4, abs_tol=1e-6), m
    settings = [f"T{t}" for t in PPL.prompt_tokens] if task == "pd_ppl" else [f"L{n}" for n in PK.lengths]
    n_req = {s: (3 if task == "pd_ppl" else 6) for s in settings}
    assert set(outs["dis"]["kv_by"]) == set(settings)
    for s in settings:
        T = int(s[1:])
        dense_b = outs["dis"]["kv_by"][s]
        assert dense_b["handoffs"] == n_req[s] and dense_b["prompt_tokens"] == n_req[s] * T
        assert dense_b["kv_bytes"] == n_req[s] * T * 4 * per_tok
        # decode keeps layers 0, 2, 3; layers 2 and 3 send only the first 4 + last 8 positions
        assert outs["kv"]["kv_by"][s]["kv_bytes"] == n_req[s] * (T * 1 + 12 * 2) * per_tok
    if task == "pd_ppl":
        for T in PPL.prompt_tokens:
            assert outs["dis"]["scores"][f"ppl_T{T}"]["value"] > 1  # a random model is far from perfect
    else:
        assert len(outs["dis"]["details"]["samples"]) == 12


def test_pipeline_runs_long_tasks_with_options_and_records_bytes_per_setting(tiny, data_dir, tmp_path):
    from harness.run import pipeline

    cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=("pd_ppl", "passkey"), limit=2,
                    modes=("disaggregated",), device="cpu", data_dir=str(data_dir), batch_size=4,
                    overrides=("pd_ppl.prompt_tokens=128,256", "pd_ppl.cont_tokens=8", "passkey.lengths=512"))
    (rec,) = pipeline.run(cfg, tmp_path, loaded=tiny)
    assert set(rec.scores["pd_ppl"]) == {"ppl", "ppl_T128", "ppl_T256"}
    assert set(rec.scores["passkey"]) >= {"acc", "acc_L512"}
    assert rec.n_samples == {"pd_ppl": 4, "passkey": 2}
    per_tok = kv_bytes_per_token(tiny.model)
    assert rec.extra["kv_by_setting"]["pd_ppl"]["T256"]["kv_bytes"] == 2 * 256 * 4 * per_tok
    assert rec.kv["passkey"]["kv_bytes"] == 2 * 512 * 4 * per_tok
    assert rec.lm_eval["tasks"]["pd_ppl"]["harness_task"]["options"]["cont_tokens"] == 8
    other = RunConfig(**{**cfg.__dict__, "overrides": ("pd_ppl.cont_tokens=16",)})
    assert pipeline.prepare(other).task_options["pd_ppl"].cont_tokens == 16
    key = lambda c: c.identity("unpruned", "disaggregated", {}, None,  # noqa: E731
                               {t: o.__dict__ for t, o in pipeline.prepare(c).task_options.items()})
    assert key(cfg) != key(other)  # task options are part of the record's identity


def test_prompts_longer_than_max_length_are_refused_before_any_cell(tiny, data_dir, tmp_path):
    """pd_ppl and passkey checked the context length inside each cell, after its planning and earlier tasks: every
    cell failed the same way (a PDTrim search of minutes each, wasted)."""
    from harness.errors import UsageError
    from harness.run import pipeline

    cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=("arc_easy", "pd_ppl"), limit=2, device="cpu",
                    modes=("disaggregated",), data_dir=str(data_dir), max_length=70,
                    overrides=("pd_ppl.prompt_tokens=64", "pd_ppl.cont_tokens=16"))
    with pytest.raises(UsageError, match=r"pd_ppl: prompts of 64 \+ 16 tokens exceed max_length 70; give --set "
                                         r"pd_ppl.prompt_tokens=55 \(prompts that fit\), a larger --max-length the model supports"):
        pipeline.run(cfg, tmp_path, loaded=tiny)
    assert not list(tmp_path.glob("*.json"))  # no cell ran
    opts = passkey.PasskeyConfig(lengths=(400, 4096), depths=(0.5,))
    with pytest.raises(UsageError, match=r"passkey: 4096 \+ 10 tokens exceed max_length 500; give --set "
                                         r"passkey.lengths=400 \(prompts that fit\)"):
        passkey.Passkey.check_max_length(opts, 500, None)
    passkey.Passkey.check_max_length(opts, 500, 1)  # --limit 1 keeps the 400-token sample only


def test_a_prompt_longer_than_the_context_is_refused_before_the_weights_load(data_dir, tmp_path, monkeypatch):
    """The long-context check needs only the tokenizer and the config: it ran after `load_model`, so a passkey length
    the model cannot hold was refused after an 8B model's minutes of loading. The same refusal, with the loader never
    called; the tokenizer and config it used are `load_model`'s."""
    from harness.errors import UsageError
    from harness.pd import models
    from harness.run import pipeline

    tok, config = models.tokenizer_and_config("random:tiny")
    loaded = models.load_model("random:tiny", "cpu")
    weights_dtype = {"dtype"}  # set on the config by loading weights
    assert {k: v for k, v in config.to_dict().items() if k not in weights_dtype} == \
        {k: v for k, v in loaded.model.config.to_dict().items() if k not in weights_dtype}
    assert tok.encode("pass key 12345") == loaded.tokenizer.encode("pass key 12345")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=("arc_easy", "passkey"), limit=2, device="cpu",
                    modes=("disaggregated",), data_dir=str(data_dir), overrides=("passkey.lengths=8192",))
    with pytest.raises(UsageError, match=r"passkey: 8192 \+ 10 tokens exceed max_length 4096"):
        pipeline.run(cfg, tmp_path)
    assert not list(tmp_path.glob("*.json"))


def test_a_context_too_short_for_any_prompt_suggests_no_prompts_that_do_not_fit():
    """Where no prompt fits the context, the refusal names no `--set` of prompts: it suggested
    pd_ppl.prompt_tokens=-27 (not a length) and passkey.lengths=64 (64 + 10 tokens, over a max_length of 70)."""
    from harness.errors import UsageError

    with pytest.raises(UsageError) as e:
        pd_ppl.PdPpl.check_max_length(pd_ppl.PplConfig(), 100, None)
    assert "--set" not in str(e.value) and "a larger --max-length the model supports" in str(e.value)
    with pytest.raises(UsageError, match=r"give --set pd_ppl.prompt_tokens=73 \(prompts that fit\)"):
        pd_ppl.PdPpl.check_max_length(pd_ppl.PplConfig(), 200, None)  # 73 + 128 - 1 = 200
    with pytest.raises(UsageError) as e:
        passkey.Passkey.check_max_length(passkey.PasskeyConfig(), 70, None)
    assert "--set" not in str(e.value) and "a larger --max-length the model supports" in str(e.value)
    with pytest.raises(UsageError, match=r"give --set passkey.lengths=90 \(prompts that fit\)"):
        passkey.Passkey.check_max_length(passkey.PasskeyConfig(), 100, None)


def test_pd_ppl_pooled_stderr_counts_an_article_once(tiny, data_dir):
    """The T-windows of one article share its text: the pooled ppl's stderr is over articles, not windows."""
    import statistics

    s = Scorer(tiny.model, PruningPlan.dense("unpruned", 4), "disaggregated", max_length=4096, batch_size=16)
    out = long_tasks.evaluate("pd_ppl", s, tiny.tokenizer, data_dir, PPL, None)
    windows = out["samples"]["pd_ppl"]
    assert len(windows) == 3 * len(PPL.prompt_tokens)
    nll = [w["nll_per_token"] for w in windows]
    articles = [statistics.mean(w["nll_per_token"] for w in windows if w["doc_id"] == i) for i in range(3)]
    pooled = out["scores"]["ppl"]
    assert math.isclose(pooled["value"], math.exp(statistics.mean(nll)), rel_tol=1e-12)
    se = statistics.stdev(articles) / math.sqrt(3)  # n - 1, as lm-eval's sample stderr
    assert math.isclose(pooled["stderr"], pooled["value"] * se, rel_tol=1e-9)
    assert not math.isclose(pooled["stderr"], pooled["value"] * statistics.stdev(nll) / math.sqrt(len(nll)), rel_tol=1e-3)


@pytest.mark.parametrize("kv_key, fails", [("1", True), ("N1", False)])
def test_a_task_must_key_its_kv_bytes_by_the_setting_its_scores_name(kv_key, fails):
    """The long-context table reads a setting's KV bytes under the name its score implies (`x_N1` -> `N1`, the
    prefix's last letter on): a task that keyed them otherwise showed '—' as every method's KV/req, silently."""
    from harness.errors import PluginContractError
    from harness.store.task_names import TaskPresentation

    @dataclasses.dataclass(frozen=True)
    class Options:
        n: int = 1

    class Keyed(long_tasks.LongTask):
        name, Config = "pd_test_keyed", Options
        presentation = TaskPresentation(title="X", setting_prefix="x_N", primary_metric="x", metric_format="decimal")

        def evaluate(self, *args, **kwargs):
            score = {"value": 1.0, "stderr": None}
            return {"scores": {"x": score, "x_N1": score}, "n_samples": 1, "kv_by": {kv_key: KV}, "details": {}}

    long_tasks.register_task(Keyed)
    try:
        if fails:
            with pytest.raises(PluginContractError, match=r"'pd_test_keyed'.*scores \['x_N1'\] have no KV bytes under "
                                                          r"\['N1'\].*\(it has \['1'\]\)"):
                long_tasks.evaluate("pd_test_keyed", None, None, None, Options(), None)
        else:
            assert long_tasks.evaluate("pd_test_keyed", None, None, None, Options(), None)["kv_by"] == {"N1": KV}
    finally:
        long_tasks.unregister_task("pd_test_keyed")


KV = {"handoffs": 1, "kv_bytes": 8, "kv_bytes_paged": 16, "prompt_tokens": 2}  # one handoff's tally


def test_pd_ppl_says_when_fewer_articles_are_long_enough_than_asked(tiny, data_dir):
    """pd_ppl.docs above the articles long enough was capped without a word (the plan announced the docs asked for)."""
    import warnings

    from harness.errors import HarnessWarning

    many = pd_ppl.PplConfig(prompt_tokens=(2000,), cont_tokens=8, docs=10_000)
    with pytest.warns(HarnessWarning, match=r"pd_ppl: only \d+ WikiText-2 test articles have 2008 tokens, so \d+ are scored, "
                                            r"not the 10000 asked for \(pd_ppl.docs=10000\)"):
        got = pd_ppl.ppl_windows(tiny.tokenizer, data_dir, many, None)
    assert 0 < len(got) < 10_000
    with warnings.catch_warnings():
        warnings.simplefilter("error", HarnessWarning)
        assert len(pd_ppl.ppl_windows(tiny.tokenizer, data_dir, pd_ppl.PplConfig(prompt_tokens=(2000,), cont_tokens=8,
                                                                                   docs=len(got)), None)) == len(got)


def test_a_chat_template_flag_with_long_tasks_says_it_does_not_reach_them():
    """--apply_chat_template with pd_ppl or passkey was silently not applied to them (raw token prompts), while their
    records said `apply_chat_template: true` and their run key differed from a run without it, for the same numbers:
    now a HarnessWarning naming the tasks; no warning without the flag or without long-context tasks."""
    import warnings
    from types import SimpleNamespace

    from harness.errors import HarnessWarning
    from harness.run.task_check import options_against_tokenizer

    prepared = SimpleNamespace(task_options={"passkey": passkey.PasskeyConfig(lengths=(400,), depths=(0.5,))})
    cfg = RunConfig(model="random:tiny", methods=("unpruned",), tasks=("arc_easy", "passkey"), limit=1, device="cpu",
                    apply_chat_template=True)
    with pytest.warns(HarnessWarning, match=r"--apply_chat_template does not apply to the long-context tasks passkey: "
                                            r"their prompts are token lists \(no chat template\)"):
        options_against_tokenizer(cfg, prepared)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HarnessWarning)
        options_against_tokenizer(dataclasses.replace(cfg, apply_chat_template=False), prepared)
        options_against_tokenizer(dataclasses.replace(cfg, tasks=("arc_easy",)), SimpleNamespace(task_options={}))


def test_records_name_the_articles_scored_and_say_the_prompts_carry_no_special_tokens(tiny, data_dir):
    """pd_ppl's record said only how many articles it scored (items `pd_ppl/0`, ... by position), and neither task's
    record said its prompts carry no BOS and no chat template: now `details.titles` (each article's title line, in
    item order) and `details.prompt`."""
    raw = (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    s = Scorer(tiny.model, PruningPlan.dense("unpruned", 4), "disaggregated", max_length=4096, batch_size=16)
    out = long_tasks.evaluate("pd_ppl", s, tiny.tokenizer, data_dir, PPL, 2)
    titles = out["details"]["titles"]
    assert len(titles) == 2 == len(out["items"]["ids"]) and all(t.startswith("= ") and t.endswith(" =") for t in titles)
    assert raw.index(f" {titles[0]} \n") < raw.index(f" {titles[1]} \n")  # file order
    windows = pd_ppl.ppl_windows(tiny.tokenizer, data_dir, PPL, 2)
    for t, w in zip(titles, windows):  # the title is where the article's window starts
        assert tiny.tokenizer.decode(w).lstrip("\n").startswith(f" {t}")
    assert "default prefix [] (BOS; [] for none)" in out["details"]["prompt"] and "no chat template" in out["details"]["prompt"]
    pk = long_tasks.evaluate("passkey", s, tiny.tokenizer, data_dir, passkey.PasskeyConfig(lengths=(400,)), 1)
    assert "default prefix [] (BOS; [] for none)" in pk["details"]["prompt"] and "no chat template" in pk["details"]["prompt"]


class _WithBos:
    """The tiny model's byte tokenizer as a BOS-adding one (Llama's habit): `encode` puts `bos` first by default."""

    def __init__(self, inner, bos: int) -> None:
        self.inner, self.bos = inner, bos

    def encode(self, text, add_special_tokens=True):
        ids = self.inner.encode(text, add_special_tokens=False)
        return [self.bos, *ids] if add_special_tokens else ids

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_long_context_prompts_start_with_the_tokenizers_bos_as_served_prompts_do(tiny, data_dir):
    """Both tasks encoded every piece without special tokens, so on a BOS-adding tokenizer (Llama's) their prompts
    had no BOS, unlike lm-eval's own tasks (HFLM keeps the tokenizer's default) and a served prompt; its first text
    token became the attention sink that first_last and StreamingLLM keep. Now the prefix starts each prompt, counted
    in its tokens; a tokenizer that adds none (SmolLM2's, the byte tokenizer) gets the very prompts it got."""
    from harness.quality.long_tasks.base import special_prefix
    from harness.run.inputs import stale_results

    bos = tiny.tokenizer.encode("a", add_special_tokens=False)[0] + 1
    llama_like = _WithBos(tiny.tokenizer, bos)
    assert special_prefix(tiny.tokenizer) == [] and special_prefix(llama_like) == [bos]
    cfg = passkey.PasskeyConfig(lengths=(400,))
    plain, with_bos = passkey.passkey_samples(tiny.tokenizer, cfg, 3), passkey.passkey_samples(llama_like, cfg, 3)
    for a, b in zip(plain, with_bos):
        assert len(a.tokens) == len(b.tokens) == 400 and b.tokens[0] == bos and a.tokens[0] != bos
        q = len(tiny.tokenizer.encode(passkey.QUESTION, add_special_tokens=False))
        assert b.tokens[-q:] == a.tokens[-q:] and a.key == b.key
    bare, prefixed = pd_ppl.ppl_windows(tiny.tokenizer, data_dir, PPL, 2), pd_ppl.ppl_windows(llama_like, data_dir, PPL, 2)
    assert [w[0] for w in prefixed] == [bos, bos] and [w[1:] for w in prefixed] == [w[:-1] for w in bare]
    # records of the versions before the prefix: reused where the tokenizer adds none, refused where it adds a BOS
    run = dataclasses.replace(RunConfig(), limit=None)
    doc = {"lm_eval": {"tasks": {"pd_ppl": {"harness_task": {"version": 2}}, "passkey": {"harness_task": {"version": 1}}}}}
    options = {"pd_ppl": PPL, "passkey": cfg}
    assert stale_results(doc, True, run, options, []) == [] and stale_results(doc, True, run, options, None) == []
    assert stale_results(doc, True, run, options, [bos]) == [
        f"pd_ppl results made by version 2 of the task, which is version 3 now (its prompts lacked this tokenizer's "
        f"prefix [{bos}])",
        f"passkey results made by version 1 of the task, which is version 2 now (its prompts lacked this tokenizer's "
        f"prefix [{bos}])"]


def test_the_prefix_of_a_tokenizer_that_also_appends_an_eos_is_its_bos(tiny):
    """A tokenizer that adds a BOS and an EOS (Llama's with `add_eos_token`) was read as adding no prefix, so its
    long-context prompts lacked the BOS its lm-eval prompts start with."""
    from harness.quality.long_tasks.base import special_prefix

    class BosEos(_WithBos):
        def encode(self, text, add_special_tokens=True):
            ids = super().encode(text, add_special_tokens)
            return [*ids, self.bos + 1] if add_special_tokens else ids

    bos = tiny.tokenizer.encode("a", add_special_tokens=False)[0] + 1
    assert special_prefix(BosEos(tiny.tokenizer, bos)) == [bos]
    assert special_prefix(_WithBos(tiny.tokenizer, bos)) == [bos] and special_prefix(tiny.tokenizer) == []
