"""`PDLM`: an lm-eval language model that scores requests through the PD engine.

A subclass of lm-eval's public `TemplateLM`: lm-eval does the context/continuation tokenisation
(same rules as its `HFLM`), this class does the scoring in `unified` or `disaggregated` mode via
`harness.quality.scoring.Scorer` and sums the KV bytes every handoff sent. One instance serves one
(method, mode); it has no request cache, so nothing is shared between methods.

Under a data-parallel launch (`harness.quality.distributed`), lm-eval gives each rank its share of the
documents and calls this class's `all_gather` / `gather_object` / `barrier`; the padding requests
lm-eval appends to even out ranks are answered without being scored, so no handoff is counted twice.
"""

from __future__ import annotations

from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from harness import stops
from harness.errors import HarnessWarning
from harness.pd.plan import PruningPlan
from harness.quality.distributed import Dist, in_doc_order
from harness.quality.scoring import Scorer

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when the config names no context length


def resolve_max_length(config, tokenizer) -> int:
    """The context length lm-eval's HFLM would use for this model."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    mml = getattr(tokenizer, "model_max_length", None)
    if mml and mml < 1_000_000:
        return int(mml)
    return DEFAULT_MAX_LENGTH


class PDLM(TemplateLM):
    """lm-eval LM over a (model, plan, mode). `tally` holds the KV bytes sent so far."""

    def __init__(
        self,
        model,
        tokenizer,
        plan: PruningPlan,
        mode: str,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        progress: bool = True,
        dist: Dist | None = None,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.dist = dist or Dist()
        self._rank, self._world_size = self.dist.rank, self.dist.world_size
        self._max_length = max_length or resolve_max_length(model.config, tokenizer)
        self._max_gen_toks = max_gen_toks
        self.progress = progress
        self.scorer = Scorer(model, plan, mode, max_length=self._max_length, batch_size=batch_size)

    # -- lm-eval plumbing ---------------------------------------------------------------------
    @property
    def tally(self):
        return self.scorer.tally

    @property
    def device(self):
        return self.scorer.device

    def all_gather(self, tensor):
        return self.dist.all_gather_tensor(tensor)

    def gather_object(self, obj, dst=0):
        """lm-eval gathers per-document metrics and samples on rank 0 and concatenates them: in document order."""
        self._drop_padding_responses()  # (already done at the barrier after the requests ran; a safety net)
        parts = self.dist.gather_object(obj, dst)
        return in_doc_order(parts) if parts is not None else None

    def barrier(self) -> None:
        # lm-eval calls this right after appending each response to its request (`req.resps.append(x)` for every
        # request it passed, padding copies included) and before it filters the responses and logs the samples
        self._drop_padding_responses()
        self.dist.barrier()

    def _without_padding(self, requests: list) -> tuple[list, int]:
        """(real requests, number of padding copies) of one call.

        With several ranks, lm-eval pads a rank's request list with copies of its last request
        (`[req] * req.repeats` per padding unit) so all ranks make the same number of forwards. The copies are
        the same `Instance` object, so lm-eval appends their answers to that request's own `resps`: they are
        noted here and removed at the next `barrier`, or the document's `--log-samples` line listed them (a
        group such as mmlu pads once per subtask: 228 copies at --limit 3 over 2 ranks) and a filter that reads
        every response (a majority vote over `repeats`) counted them.
        """
        if self.world_size == 1 or not requests:
            return requests, 0
        last = requests[-1]
        n_pad = sum(1 for r in requests if r is last) - getattr(last, "repeats", 1)
        if n_pad <= 0:
            return requests, 0
        self.__dict__.setdefault("_padded", []).append((last, n_pad))
        return requests[: len(requests) - n_pad], n_pad

    def _drop_padding_responses(self) -> None:
        """Remove the answers to padding copies that lm-eval appended to the padded requests' `resps`."""
        for req, n_pad in self.__dict__.pop("_padded", []):
            resps = getattr(req, "resps", None)
            if isinstance(resps, list) and len(resps) >= n_pad + getattr(req, "repeats", 1):  # the copies' answers came
                del resps[len(resps) - n_pad:]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        stops.check()  # a stop a library swallowed while lm-eval built the requests (harness.stops)
        real, n_pad = self._without_padding(list(requests))
        # lm-eval's "Tokenizing inputs" bar: shown only with ours (an explicit disable=False beats TQDM_DISABLE)
        res = super().loglikelihood(real, disable_tqdm=disable_tqdm or not self.progress)
        return res + res[-1:] * n_pad

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # Same convention as HFLM: BOS if the tokenizer has one, else EOS.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    # -- chat templates (lm-eval's --apply_chat_template), as HFLM applies them ---------------------
    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The few-shot chat rendered by the tokenizer's chat template, as text (HFLM's rule). A template that refuses
        the chat (one without a system role, such as Mistral-7B-Instruct-v0.2's, given a task's description as the
        system message: MMLU's) renders it again without its system messages, as HFLM does, with HFLM's warning."""
        import warnings

        import jinja2

        def render(chat: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError as e:
            if not any(msg["role"] == "system" for msg in chat_history):
                raise  # nothing to leave out: the template's own error, not a warning about a system message
            warnings.warn(f"--apply-chat-template: {self.tokenizer.name_or_path}'s chat template refused a chat with a "
                          f"system message ({e}); rendered without it, as lm-eval's HFLM does (the task's description is "
                          "left out of the prompt)", HarnessWarning, stacklevel=2)
            return render([msg for msg in chat_history if msg["role"] != "system"])

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """HFLM's rule: the tokenizer's own special tokens, except none for a text that already starts with the
        prefix (BOS) token, as a chat template renders it (else a BOS-adding tokenizer would give two)."""
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- the three request types --------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        res = self.scorer.loglikelihood(pairs, progress=self.progress and not disable_tqdm)
        for (key, _, _), ans in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        stops.check()  # a stop a library swallowed while lm-eval built the requests (harness.stops)
        requests, n_pad = self._without_padding(list(requests))
        out = self._rolling(requests, disable_tqdm)
        return out + out[-1:] * n_pad

    def _rolling(self, requests, disable_tqdm: bool) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        scores = self.scorer.loglikelihood(windows, progress=self.progress and not disable_tqdm)
        out = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            out[i] += lp
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation; each request's `until` strings (and EOS) stop it."""
        stops.check()
        requests, n_pad = self._without_padding(list(requests))
        out = self._generate(requests, disable_tqdm)
        return out + out[-1:] * n_pad

    def _gen_options(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int]:
        """(stop strings, max new tokens) of a request's generation kwargs, read as HFLM reads them (lm-eval's
        `normalize_gen_kwargs`): `max_gen_toks` or its aliases `max_new_tokens`, `max_tokens`, `max_completion_tokens`,
        and a `temperature` > 0 without `do_sample` means sampling, which PDLM does not do (a ValueError)."""
        kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        if kw.get("do_sample") and kw.get("temperature", 1.0) != 0:
            raise ValueError("PDLM generates greedily; do_sample=True (or a temperature > 0) is not supported")
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u]  # `until: None` normalises to [None]
        return until, int(kw["max_gen_toks"])

    def _eos_ids(self) -> set[int]:
        """The tokens that end a generation: the tokenizer's EOS and, as `model.generate` under HFLM stops on them,
        every `eos_token_id` of the model's generation config (Llama 3.1 Instruct's lists three)."""
        ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        return {self.eot_token_id, *map(int, ids)}

    def _generate(self, requests, disable_tqdm: bool) -> list[str]:
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        eos_ids = self._eos_ids()
        for idxs in by_kwargs.values():
            until, max_new = self._gen_options(requests[idxs[0]].args[1])
            eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            stops = until + ([eos] if eos not in until else [])
            # an empty context (no BOS in the tokenizer) starts from the prefix token, as loglikelihood's does
            contexts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in idxs]

            def should_stop(j: int, gen: list[int], stops: list[str] = stops, eos_ids: set[int] = eos_ids) -> bool:
                if gen[-1] in eos_ids:
                    return True
                text = self.tok_decode(gen, skip_special_tokens=False)
                return any(s in text for s in stops)

            gens = self.scorer.generate(contexts, max_new, should_stop)
            for i, gen in zip(idxs, gens):
                # HFLM's answer: the tokens decoded without special tokens, cut at the first stop string (the
                # stopping above reads them with special tokens, as HFLM's stopping criteria do)
                out[i] = postprocess_generated_text(self.tok_decode(gen), stops, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
            bar.update(len(idxs))
        bar.close()
        return out
