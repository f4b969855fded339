"""Sampling through the KV cache: prefill the prompt once, then one token per step.

`decode` runs the project's one generation loop (`lrkv.generate.generate_batch`, which
`Transformer.generate` runs too) with the two options the evaluation needs: a per-step stop test
(lm-eval's stop strings, checked on the decoded text) and timing (prefill vs decode tokens/s), so
greedy decoding gives exactly `model.generate`'s tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lrkv.errors import ConfigError
from lrkv.generate import generate_batch


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
    prompt: torch.Tensor | list[torch.Tensor],
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
    """Continue prompts (B, T), or a list of 1-D prompts of different lengths, through one KV cache.

    A row stops at `stop_token` (not included in its output) or when `should_stop(row, new_tokens)`
    returns True (the tokens so far are kept; the caller trims stop strings). Decoding ends when
    every row stopped or after max_new_tokens.
    """
    if isinstance(prompt, (list, tuple)):  # prompts of different lengths: one batch (see generate_batch)
        b, total = len(prompt), sum(int(p.numel()) for p in prompt)
    elif prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ConfigError(f"prompt must be a non-empty (batch, time) tensor, got shape {tuple(prompt.shape)}")
    else:
        b, total = prompt.shape[0], prompt.numel()
    out = Decoded(tokens=[[] for _ in range(b)], prompt_tokens=total, stopped=[False] * b)
    gen = generate_batch(
        model,
        prompt,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_token=stop_token,
        should_stop=should_stop,
        generator=generator,
        cache_dtype=cache_dtype,
    )
    out.tokens, out.stopped, out.steps = gen.new_tokens, gen.stopped, gen.steps
    out.prefill_s, out.decode_s = gen.prefill_s, gen.decode_s
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
    """Completions of text prompts (each `num_samples` times, all in one batch), with tokens/s.

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
    budget = model.cfg.max_seq_len - max_new_tokens
    if budget < 1:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_seq_len={model.cfg.max_seq_len}"
        )
    stop, encode = tok.eos_id, tok.encode
    if chat:
        from lrkv.data.chat import ASSISTANT_END, CHAT_TOKENS, chat_ids, prompt_ids

        if tok.backend.token_to_id(ASSISTANT_END) is None:
            raise ConfigError(
                f"generate.chat=true needs a chat model: its tokenizer has no {', '.join(CHAT_TOKENS)} "
                "(train it with data=chat, docs/post-training.md)"
            )
        stop = chat_ids(tok)[ASSISTANT_END]

        def encode(prompt):
            return prompt_ids(prompt, tok)

    # documents (and conversations) follow an end-of-text in training; "" = unconditional
    encoded = [([tok.eos_id] + encode(prompt))[-budget:] for prompt in prompts]
    rows = [torch.tensor(ids, device=device) for ids in encoded for _ in range(num_samples)]
    dec = decode(  # every prompt and sample in one batch (prompts of different lengths share it)
        model,
        rows,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_token=stop,
        generator=generator,
        cache_dtype=cache_dtype,
    )
    new_tokens, seconds = dec.new_tokens, dec.prefill_s + dec.decode_s
    results = []
    for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
        mine = dec.tokens[i * num_samples : (i + 1) * num_samples]
        results.append(
            {
                "prompt": prompt,
                "prompt_tokens": len(ids),
                "completions": [tok.decode(t) for t in mine],
                "new_tokens": sum(len(t) for t in mine),
                "prefill_s": dec.prefill_s,  # the batch's, shared by all prompts
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
