"""Sampling through the KV cache: prefill the prompt once, then one token per step.

`decode` is `Transformer.generate` with two additions the evaluation needs: a per-step stop test
(lm-eval's stop strings, checked on the decoded text) and timing (prefill vs decode tokens/s). It
uses the same cache and the same `sample_next`, so greedy decoding gives exactly `model.generate`'s
tokens (tests compare it with the cache-free reference `generate(use_cache=False)`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lrkv.errors import ConfigError
from lrkv.generate import sample_next


@dataclass
class Decoded:
    tokens: list[list[int]]  # new tokens per row (stop token and anything after it removed)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    prompt_tokens: int = 0
    stopped: list[bool] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all rows) per second of decoding, prefill included."""
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


@torch.no_grad()
def decode(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    generator: torch.Generator | None = None,
    cache_dtype: torch.dtype | None = None,
) -> Decoded:
    """Continue equal-length prompts (B, T) through a KV cache.

    A row stops at `stop_token` (not included in its output) or when `should_stop(row, new_tokens)`
    returns True (the tokens so far are kept; the caller trims stop strings). Decoding ends when
    every row stopped or after max_new_tokens.
    """
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ConfigError(f"prompt must be a non-empty (batch, time) tensor, got shape {tuple(prompt.shape)}")
    b, t = prompt.shape
    max_len = model.cfg.max_seq_len
    if t + max_new_tokens > max_len:
        raise ConfigError(
            f"prompt of {t} tokens + max_new_tokens={max_new_tokens} exceeds max_seq_len={max_len}; "
            "shorten the prompt or lower max_new_tokens"
        )
    out = Decoded(tokens=[[] for _ in range(b)], prompt_tokens=b * t, stopped=[False] * b)
    if max_new_tokens <= 0:
        return out
    cache = model.new_cache(b, t + max_new_tokens, cache_dtype)
    step_input = prompt
    start = time.perf_counter()
    for step in range(max_new_tokens):
        logits = model(step_input, cache)
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        if step == 0:
            out.prefill_s = time.perf_counter() - start
        out.steps += 1
        for row, tok in enumerate(nxt.tolist()):
            if out.stopped[row]:
                continue
            if stop_token is not None and tok == stop_token:
                out.stopped[row] = True
                continue
            out.tokens[row].append(tok)
            if should_stop is not None and should_stop(row, out.tokens[row]):
                out.stopped[row] = True
        if all(out.stopped):
            break
        step_input = nxt[:, None]
    out.decode_s = time.perf_counter() - start - out.prefill_s
    return out


def generate_text(
    pretrained,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    seed: int = 0,
    cache_dtype: torch.dtype | None = None,
    chat: bool = False,
) -> dict:
    """Completions of text prompts (each `num_samples` times, batched per prompt), with tokens/s.

    chat=True (a chat mid-trained model, lrkv/data/chat.py): each prompt is a user turn in the chat
    template, followed by <|assistant_start|>; generation stops at <|assistant_end|> (not included)."""
    from lrkv.io import require_tokenizer

    tok = require_tokenizer(pretrained, "generation")
    model = pretrained.model
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    results, new_tokens, seconds = [], 0, 0.0
    stop = tok.eos_id
    if chat:
        from lrkv.data.chat import ASSISTANT_END, CHAT_TOKENS, chat_ids, prompt_ids

        if tok.backend.token_to_id(ASSISTANT_END) is None:
            raise ConfigError(
                f"generate.chat=true needs a chat model: its tokenizer has no {', '.join(CHAT_TOKENS)} "
                "(train it with data=chat, docs/post-training.md)"
            )
        stop = chat_ids(tok)[ASSISTANT_END]
    for prompt in prompts:
        # documents (and conversations) follow an end-of-text in training; "" = unconditional
        ids = [tok.eos_id] + (prompt_ids(prompt, tok) if chat else tok.encode(prompt))
        budget = model.cfg.max_seq_len - max_new_tokens
        if budget < 1:
            raise ConfigError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_seq_len={model.cfg.max_seq_len}"
            )
        ids = ids[-budget:]
        x = torch.tensor([ids] * num_samples, device=device)
        dec = decode(
            model,
            x,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_token=stop,
            generator=generator,
            cache_dtype=cache_dtype,
        )
        new_tokens += dec.new_tokens
        seconds += dec.prefill_s + dec.decode_s
        results.append(
            {
                "prompt": prompt,
                "prompt_tokens": len(ids),
                "completions": [tok.decode(t) for t in dec.tokens],
                "new_tokens": dec.new_tokens,
                "prefill_s": dec.prefill_s,
                "decode_s": dec.decode_s,
                "tokens_per_s": dec.tokens_per_s,
            }
        )
    return {
        "samples": results,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": new_tokens / max(seconds, 1e-9),
        "settings": {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "num_samples": num_samples,
            "seed": seed,
            "chat": chat,
        },
    }


def report_samples(result: dict) -> str:
    lines = []
    for s in result["samples"]:
        for i, text in enumerate(s["completions"]):
            tag = f" [{i + 1}/{len(s['completions'])}]" if len(s["completions"]) > 1 else ""
            lines.append(f"--- prompt{tag}: {s['prompt']!r}")
            lines.append(s["prompt"] + text)
    lines.append(
        f"--- {result['new_tokens']} new tokens in {result['seconds']:.2f} s: {result['tokens_per_s']:.1f} tokens/s "
        f"(temperature={result['settings']['temperature']}, top_k={result['settings']['top_k']}, "
        f"top_p={result['settings']['top_p']})"
    )
    return "\n".join(lines)
