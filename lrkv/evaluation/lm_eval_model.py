"""lm-evaluation-harness language model `lrkv`: any lrkv checkpoint in lm-eval.

    import lrkv.evaluation.lm_eval_model  # registers "lrkv"
    lm_eval.simple_evaluate(model="lrkv", model_args="checkpoint=RUN_DIR,batch_size=8", tasks=[...])

model_args: checkpoint (alias pretrained; run folder, pretrained folder or checkpoint), device (cpu),
batch_size (requests per forward, or "auto": the largest that fits, lrkv.evaluation.batching;
max_batch_size caps it, default 64), dtype (float32 | bfloat16 | float16), max_length
(context window; default and ceiling: the model's max_seq_len), max_gen_toks (256), prefix_eos.

Conventions (those of lm-eval's HF model, plus one):
- loglikelihood: context and continuation are tokenized together and split (trailing spaces of the
  context move to the continuation; TemplateLM._encode_pair). With `prefix_eos` (default True) the
  end-of-text token is put before every context: training packs documents after an end-of-text, so
  this is how the model saw the start of a text. An empty context is the end-of-text token alone.
  One forward pass over context + continuation (right-padded batches, sorted by length), the last
  max_length + 1 tokens kept (the context is truncated from the left); the score is the sum of
  log-probabilities of the continuation tokens, `is_greedy` whether each was the argmax.
- loglikelihood_rolling: the whole text in disjoint windows of max_length predicted tokens (lm-eval's
  `get_rolling_token_windows` with context_len 1), first token predicted from end-of-text.
- generate_until: the prompt (with the end-of-text prefix, left-truncated to max_length - max_gen_toks)
  is decoded through the KV cache (`lrkv.generate.generate_batch`), batched over requests with equal
  generation settings (prompts of different lengths share a batch); a row stops at end-of-text, at a
  stop string (checked on the decoded text each step) or after max_gen_toks; the text is cut before the
  first stop string.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lrkv.errors import ConfigError
from lrkv.evaluation.batching import auto_batch_size, parse_batch_size
from lrkv.generate import generate_batch
from lrkv.io import load_pretrained, parse_dtype, require_tokenizer

log = logging.getLogger(__name__)


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@register_model("lrkv")
class LrkvLM(TemplateLM):
    def __init__(
        self,
        checkpoint=None,
        device: str | None = "cpu",
        batch_size=8,
        dtype: str | None = "float32",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        prefix_eos=True,
        pretrained=None,
        max_batch_size=None,
        **unused,
    ):
        super().__init__()
        if unused:
            log.warning("lrkv LM ignores model_args %s", sorted(unused))
        source = checkpoint if checkpoint is not None else pretrained
        if source is None:
            raise ConfigError("lm-eval model 'lrkv' needs model_args='checkpoint=PATH'")
        device = device or "cpu"
        if hasattr(source, "model") and hasattr(source, "tokenizer"):  # an already loaded Pretrained
            loaded = source
            loaded.model.to(device=device, dtype=parse_dtype(dtype))
        else:
            loaded = load_pretrained(source, device=device, dtype=dtype or "float32")
        self.pretrained = loaded
        self.model = loaded.model.eval()
        self.tokenizer = require_tokenizer(loaded, "lm-eval")
        self._device = torch.device(device)
        limit = self.model.cfg.max_seq_len
        self._max_length = min(int(max_length), limit) if max_length else limit
        fixed = parse_batch_size(batch_size)
        self.batch_size_requested = str(batch_size)
        self.batch_size = fixed or auto_batch_size(self.model, self._max_length, max_batch_size=max_batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.prefix_eos = _as_bool(prefix_eos)

    # ---- TemplateLM interface -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context_enc, continuation_enc = super()._encode_pair(context, continuation)
        if self.prefix_eos:
            context_enc = [self.eot_token_id] + context_enc
        return context_enc, continuation_enc

    # ---- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), all greedy) for token-id pairs, batched by length."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        windows = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                results[i] = (0.0, True)
                continue
            if not ctx:
                raise ConfigError("a scored continuation needs at least one context token")
            if len(cont) > self.max_length:
                raise ConfigError(f"continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
            full = (ctx + cont)[-(self.max_length + 1) :]
            windows.append((i, full[:-1], len(cont)))
        windows.sort(key=lambda w: -len(w[1]))  # long first: little padding, and the first batch shows OOM early
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start : start + self.batch_size]
            width = max(len(w[1]) for w in chunk)
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (_, inp, _) in enumerate(chunk):
                inputs[row, : len(inp)] = torch.tensor(inp)
            logits = self.model(inputs.to(self.device))
            for row, (i, inp, n) in enumerate(chunk):
                ctx, cont = pairs[i]
                target = torch.tensor(cont[-n:], device=self.device)
                logp = F.log_softmax(logits[row, len(inp) - n : len(inp)].float(), dim=-1)
                score = logp.gather(-1, target[:, None]).sum().item()
                greedy = bool((logp.argmax(-1) == target).all())
                results[i] = (score, greedy)
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        scores = self.score_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), answer in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        owners, pairs = [], []
        for idx, req in enumerate(requests):
            (text,) = req.args[:1]
            tokens = self.tok_encode(text)
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1
                ),
            ):
                owners.append(idx)
                pairs.append((list(ctx), list(cont)))
        totals = [0.0] * len(requests)
        for idx, (score, _) in zip(owners, self.score_tokens(pairs)):
            totals[idx] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation -------------------------------------------------------------------------------
    def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int, float, int | None, float | None]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_gen = kwargs.pop("max_gen_toks", None) or kwargs.pop("max_new_tokens", None) or self.max_gen_toks
        do_sample = _as_bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not do_sample:
            temperature = 0.0
        top_k = kwargs.pop("top_k", None)
        top_p = kwargs.pop("top_p", None)
        return (
            [s for s in until if s],
            int(max_gen),
            temperature,
            (int(top_k) if top_k else None),
            (float(top_p) if top_p else None),
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prepared = []
        for req in requests:
            context, gen_kwargs = req.args[0], (req.args[1] if len(req.args) > 1 else {})
            until, max_gen, temperature, top_k, top_p = self._gen_settings(gen_kwargs)
            max_gen = min(max_gen, self.max_length - 1)
            ids = self.tok_encode(context)
            if self.prefix_eos or not ids:
                ids = [self.eot_token_id] + ids
            ids = ids[-(self.max_length - max_gen) :]
            prepared.append((ids, until, max_gen, temperature, top_k, top_p))
        groups = defaultdict(list)  # equal settings decode together (prompts of any lengths share a batch)
        for i, (_ids, until, max_gen, temperature, top_k, top_p) in enumerate(prepared):
            groups[(tuple(until), max_gen, temperature, top_k, top_p)].append(i)
        outputs: list[str | None] = [None] * len(requests)
        for (until, max_gen, temperature, top_k, top_p), members in groups.items():
            members.sort(key=lambda i: -len(prepared[i][0]))  # similar lengths together: fewer one-by-one prompt steps
            for start in range(0, len(members), self.batch_size):
                rows = members[start : start + self.batch_size]
                prompt = [torch.tensor(prepared[i][0], device=self.device) for i in rows]

                def hit_stop(row, new, until=until):
                    return bool(until) and any(s in self.tok_decode(new) for s in until)

                dec = generate_batch(
                    self.model,
                    prompt,
                    max_gen,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    stop_token=self.eot_token_id,
                    should_stop=hit_stop,
                )
                for row, i in enumerate(rows):
                    text = self.tok_decode(dec.new_tokens[row])
                    for s in until:
                        if s:
                            text = text.split(s)[0]
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs  # type: ignore[return-value]
