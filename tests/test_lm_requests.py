"""PDLM's three lm-eval request types agree across modes on real text, and generation honours `until`."""

import torch
from lm_eval.api.instance import Instance

from harness.pd.plan import KVPolicy, PruningPlan
from harness.quality.lm import PDLM
from harness.quality.tasks import local_rows


def lm(tiny, mode, plan=None, max_length=256):
    return PDLM(tiny.model, tiny.tokenizer, plan or PruningPlan.dense("u", 4), mode, batch_size=3,
                max_length=max_length, progress=False)


def inst(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_rolling_loglikelihood_agrees_and_matches_windows(tiny, data_dir):
    pages = [r["page"][:1500] for r in local_rows("wikitext", data_dir)["test"][:3]]
    reqs = [inst("loglikelihood_rolling", (p,), i) for i, p in enumerate(pages)]
    uni = lm(tiny, "unified").loglikelihood_rolling(reqs, disable_tqdm=True)
    dis_lm = lm(tiny, "disaggregated")
    dis = dis_lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert max(abs(a - b) for a, b in zip(uni, dis)) <= 1e-3  # sums over ~1500 tokens each
    assert all(u < 0 for u in uni)
    # reference: the same windows scored by plain forwards
    ref_total = 0.0
    from lm_eval import utils

    for p in pages:
        for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                tiny.tokenizer.encode(p), dis_lm.prefix_token_id, 256, 1)):
            with torch.inference_mode():
                logp = torch.log_softmax(tiny.model(torch.tensor([ctx + cont[:-1]])).logits[0].float(), -1)
            ref_total += sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert abs(ref_total - sum(uni)) <= 1e-3
    assert dis_lm.tally.handoffs > len(pages)  # every window is a PD request


def test_generate_until_modes_agree_and_stop(tiny):
    prompts = ["Question: what is 2+2?\nAnswer:", "The quick brown fox", "a"]
    reqs = [inst("generate_until", (p, {"until": ["\n\n", "zz"], "max_gen_toks": 24}), i) for i, p in enumerate(prompts)]
    uni = lm(tiny, "unified").generate_until(reqs, disable_tqdm=True)
    dis_lm = lm(tiny, "disaggregated")
    dis = dis_lm.generate_until(reqs, disable_tqdm=True)
    assert uni == dis and all(isinstance(t, str) for t in dis)
    assert all("zz" not in t and "\n\n" not in t for t in dis)
    assert dis_lm.tally.handoffs == 3
    # a stop string that the greedy output contains cuts it there
    full = lm(tiny, "disaggregated").generate_until([inst("generate_until", (prompts[1], {"until": [], "max_gen_toks": 24}))],
                                                    disable_tqdm=True)[0]
    assert len(full) > 3
    stop = full[2:4]
    cut = lm(tiny, "disaggregated").generate_until([inst("generate_until", (prompts[1], {"until": [stop], "max_gen_toks": 24}))],
                                                   disable_tqdm=True)[0]
    assert cut == full.split(stop)[0] and len(cut) < len(full)
    # an empty context (the byte tokenizer adds no BOS) continues from the prefix token, like loglikelihood's
    empty_lm = lm(tiny, "disaggregated")
    empty = empty_lm.generate_until([inst("generate_until", ("", {"until": [], "max_gen_toks": 6}))], disable_tqdm=True)[0]
    from_prefix = empty_lm.scorer.generate([[empty_lm.prefix_token_id]], 6)[0]
    assert empty == empty_lm.tok_decode(from_prefix, skip_special_tokens=False)


def test_kv_policy_reaches_generation(tiny):
    plan = PruningPlan("x", 4, (0, 1, 2, 3), (0, 1, 2, 3), KVPolicy(2, 2, (0, 1, 2, 3)))
    long_prompt = "The history of the city begins in the twelfth century, when a small settlement grew. " * 2
    reqs = [inst("generate_until", (long_prompt, {"until": [], "max_gen_toks": 8}))]
    pruned = lm(tiny, "disaggregated", plan)
    pruned.generate_until(reqs, disable_tqdm=True)
    n = len(tiny.tokenizer.encode(long_prompt))
    per_token = 2 * 2 * 16 * 4  # K+V, 2 kv heads, head_dim 16, fp32
    assert pruned.tally.kv_bytes == 4 * 4 * per_token  # 4 layers x (2 first + 2 last) positions
    dense = lm(tiny, "disaggregated")
    dense.generate_until(reqs, disable_tqdm=True)
    assert dense.tally.kv_bytes == 4 * n * per_token


def test_generate_until_reads_max_tokens_aliases_and_temperature_as_hflm(tiny):
    """lm-eval 0.4.13's HFLM reads `max_new_tokens` / `max_tokens` / `max_completion_tokens` as `max_gen_toks`, and a
    temperature > 0 without `do_sample` as sampling (`normalize_gen_kwargs`): PDLM generated max_gen_toks (256 by
    default) tokens for the first, and greedily for the second."""
    import pytest

    pd = lm(tiny, "disaggregated")
    lengths = []
    real = pd.scorer.generate
    pd.scorer.generate = lambda c, n, stop=None, progress=False: lengths.append(n) or real(c, n, stop, progress)
    for alias in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        pd.generate_until([inst("generate_until", ("The quick brown fox", {"until": [], alias: 3}))], disable_tqdm=True)
    assert lengths == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="greedily"):
        pd.generate_until([inst("generate_until", ("a", {"until": [], "temperature": 0.2}))], disable_tqdm=True)
    pd.generate_until([inst("generate_until", ("a", {"until": [], "do_sample": False, "temperature": 0.2, "max_gen_toks": 2}))],
                      disable_tqdm=True)  # do_sample=False: greedy, as HFLM reads it
    assert lengths[-1] == 2
    pd.generate_until([inst("generate_until", ("a", {"until": None, "max_gen_toks": 2}))], disable_tqdm=True)  # no stop
    assert lengths[-1] == 2


def test_tok_encode_adds_no_second_bos_as_hflm(tiny):
    """A BOS-adding tokenizer and a text that already starts with BOS (a chat template renders it, e.g. Llama 3's):
    HFLM encodes it without special tokens, PDLM encoded it with a second BOS, so every request scored differently."""
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM
    from tokenizers import processors

    from harness.pd.models import byte_tokenizer

    tok = byte_tokenizer(320)
    tok.bos_token = "<|endoftext|>"
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                  special_tokens=[("<|endoftext|>", 256)])
    pd = PDLM(tiny.model, tok, PruningPlan.dense("u", 4), "unified", max_length=256, progress=False)
    stock = SimpleNamespace(tokenizer=tok, add_bos_token=None, prefix_token_id=pd.prefix_token_id)
    for text in ("<|endoftext|><|im_start|>user\nhi", "hi there"):
        assert pd.tok_encode(text) == HFLM.tok_encode(stock, text)
        assert pd.tok_encode(text).count(256) == 1
    assert pd.tok_encode("hi", add_special_tokens=False) == HFLM.tok_encode(stock, "hi", add_special_tokens=False)


def test_prefix_token_is_bos_when_the_tokenizer_has_one_else_eos(tiny):
    """HFLM's convention: an empty context (and every rolling window's first) starts from BOS; only a tokenizer without
    one falls back to EOS. The tiny byte tokenizer has no BOS, so this is checked on one that has."""
    from harness.pd.models import byte_tokenizer

    tok = byte_tokenizer(320)
    tok.add_special_tokens({"bos_token": "<|bos|>"})
    assert tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id
    with_bos = PDLM(tiny.model, tok, PruningPlan.dense("u", 4), "unified", max_length=256, progress=False)
    assert with_bos.prefix_token_id == tok.bos_token_id
    assert lm(tiny, "unified").prefix_token_id == tiny.tokenizer.eos_token_id  # no BOS: EOS


def test_generated_text_stops_before_eos_and_leaves_its_text_out(tiny):
    """A generation that ends with EOS: the answer is the text before it, not '...<|endoftext|>' (the EOS token is
    decoded with special tokens, so it has to be one of the stop strings)."""
    pd = lm(tiny, "disaggregated")
    body = tiny.tokenizer.encode("42 apples")
    pd.scorer.generate = lambda contexts, n, stop=None, progress=False: [body + [pd.eot_token_id] for _ in contexts]
    out = pd.generate_until([inst("generate_until", ("Q:", {"until": ["\n\n"], "max_gen_toks": 24}))], disable_tqdm=True)
    assert out == ["42 apples"]


def test_generated_text_leaves_special_tokens_out_as_hflm(tiny):
    """A generation with a special token that is not EOS (SmolLM2-Instruct's greedy answer to a chat prompt begins
    '<|im_start|>assistant'): HFLM decodes the answer without special tokens and then cuts it at the stop strings; PDLM
    kept '<|im_start|>' in the text, so an exact-match or regex filter scored the same tokens differently."""
    from lm_eval.models.utils import postprocess_generated_text

    from harness.pd.models import byte_tokenizer

    tok = byte_tokenizer(320)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    start = tok.convert_tokens_to_ids("<|im_start|>")
    pd = PDLM(tiny.model, tok, PruningPlan.dense("u", 4), "disaggregated", max_length=256, progress=False)
    gens = {"a": [start] + tok.encode("assistant\nHi", add_special_tokens=False) + [pd.eot_token_id],
            "b": tok.encode("x\n", add_special_tokens=False) + [start] + tok.encode("\nrest", add_special_tokens=False)}
    pd.scorer.generate = lambda contexts, n, stop=None, progress=False: [gens[tok.decode(c)] for c in contexts]
    until = ["\n\n"]
    out = pd.generate_until([inst("generate_until", (p, {"until": until, "max_gen_toks": 24}), i)
                             for i, p in enumerate(gens)], disable_tqdm=True)
    eos = tok.decode([pd.eot_token_id], skip_special_tokens=False)
    assert out == [postprocess_generated_text(tok.decode(g, skip_special_tokens=True), [*until, eos], None)
                   for g in gens.values()]
    assert out == ["assistant\nHi", "x"]


def test_generation_stops_on_every_eos_of_the_generation_config(tiny, monkeypatch):
    """`model.generate` (HFLM's) stops on each `eos_token_id` of the model's generation config, a list for models such
    as Llama 3.1 Instruct (<|end_of_text|>, <|eom_id|>, <|eot_id|>); PDLM stopped only on the tokenizer's EOS, so it went
    on past <|eom_id|> and its answer held the text generated after it."""
    from harness.pd.models import byte_tokenizer

    tok = byte_tokenizer(320)
    tok.add_special_tokens({"additional_special_tokens": ["<|eom|>"]})
    eom = tok.convert_tokens_to_ids("<|eom|>")
    monkeypatch.setattr(tiny.model.generation_config, "eos_token_id", [tok.eos_token_id, eom])
    pd = PDLM(tiny.model, tok, PruningPlan.dense("u", 4), "unified", max_length=256, progress=False)
    tokens = tok.encode("Hi", add_special_tokens=False) + [eom] + tok.encode(" and more", add_special_tokens=False)

    def generate(contexts, n, stop=None, progress=False):  # the scorer's loop: a token at a time until `stop`
        gens = []
        for j, _ in enumerate(contexts):
            gen = []
            for t in tokens[:n]:
                gen.append(t)
                if stop(j, gen):
                    break
            gens.append(gen)
        return gens

    pd.scorer.generate = generate
    assert pd.generate_until([inst("generate_until", ("Q:", {"until": ["\n\n"], "max_gen_toks": 24}))],
                             disable_tqdm=True) == ["Hi"]


def test_chat_template_without_a_system_role_renders_as_hflm(tiny):
    """lm-eval makes a task's description (MMLU's) the chat's system message; a template that refuses one (Mistral-7B-
    Instruct-v0.2's: roles must alternate user/assistant) made PDLM raise jinja2's TemplateError, ending the cell, where
    HFLM renders the chat again without its system messages."""
    from types import SimpleNamespace

    import pytest
    from lm_eval.models.huggingface import HFLM

    from harness.errors import HarnessWarning
    from harness.pd.models import byte_tokenizer

    tok = byte_tokenizer(320)
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                         "[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    pd = PDLM(tiny.model, tok, PruningPlan.dense("u", 4), "unified", max_length=256, progress=False)
    stock = SimpleNamespace(tokenizer=tok, chat_template_args={})
    chat = [{"role": "system", "content": "About maths."}, {"role": "user", "content": "1+1?"}]
    with pytest.warns(HarnessWarning, match="system message"):
        assert pd.apply_chat_template(chat) == HFLM.apply_chat_template(stock, chat) == "[user]1+1?[assistant]"
    assert pd.apply_chat_template(chat[1:]) == "[user]1+1?[assistant]"
    import warnings

    import jinja2

    with warnings.catch_warnings():  # a chat the template refuses with no system message to leave out: its own error
        warnings.simplefilter("error", HarnessWarning)
        with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
            pd.apply_chat_template([{"role": "assistant", "content": "Hi."}])
