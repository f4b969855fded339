"""Text in, text out through the KV cache: `generate_text` encodes prompts, runs the project's one
generation loop (`lrkv.generate.generate_batch`, which `Transformer.generate` and lm-eval's
generate_until run too) over all of them in one batch, and reports prefill/decode timing, so greedy
decoding gives exactly `model.generate`'s tokens.
"""

from __future__ import annotations

import torch

from lrkv.errors import ConfigError
from lrkv.generate import generate_batch


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
    dec = generate_batch(  # every prompt and sample in one batch (prompts of different lengths share it)
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
    new_tokens, seconds = dec.num_new_tokens, dec.prefill_s + dec.decode_s
    results = []
    for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
        mine = dec.new_tokens[i * num_samples : (i + 1) * num_samples]
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
        "tokens_per_s": dec.tokens_per_s,
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
