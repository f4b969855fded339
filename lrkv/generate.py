"""Choosing the next token (greedy, temperature, top-k, top-p) and the one generation loop.

`generate_batch` is the only decoding loop of the project: `Transformer.generate` (tensors or lists of
prompts of different lengths) and the evaluation's sampling and lm-eval generation all call it.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lrkv.errors import ConfigError


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V). temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class Generation:
    """What `generate_batch` produced."""

    tokens: torch.Tensor | None  # equal-length prompts: (B, T + steps), a stopped row repeats stop_token
    new_tokens: list[list[int]]  # per row, the tokens before its stop (stop token excluded)
    stopped: list[bool]  # per row: stopped by stop_token or should_stop (else it ran out of max_new_tokens)
    stop_hit: list[bool]  # per row: stopped by stop_token
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0  # all rows' prompt tokens

    @property
    def num_new_tokens(self) -> int:
        return sum(len(t) for t in self.new_tokens)

    @property
    def tokens_per_s(self) -> float:
        """New tokens (all rows) per second of generation, prefill included."""
        return self.num_new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


@torch.no_grad()
def generate_batch(
    model,
    tokens: torch.Tensor | list[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    cache_dtype: torch.dtype | None = None,
) -> Generation:
    """The one generation loop: prompts (B, T), or a list of 1-D prompts of different lengths, one cache.

    The common length L_min of all prompts is prefilled at once; then every step feeds one token per
    row: a longer prompt's own next token while its prompt lasts (its sampled token is dropped), then
    the row's sampled tokens. No padding is ever attended, so each row computes what it computes
    alone (up to float rounding of chunked vs token-by-token prefill). A row stops at `stop_token`
    (excluded from new_tokens; the row then repeats it), when `should_stop(row, new_tokens)` returns
    True after a token, or after max_new_tokens new tokens; the loop ends when every row stopped.
    use_cache=False recomputes the whole sequence every step (the reference; equal lengths only).
    """
    if isinstance(tokens, torch.Tensor) and (tokens.dim() != 2 or tokens.shape[1] == 0):
        raise ConfigError(f"prompt must be a non-empty (batch, time) tensor, got shape {tuple(tokens.shape)}")
    rows = list(tokens) if isinstance(tokens, (list, tuple)) else list(tokens.unbind(0))
    lens = [int(r.numel()) for r in rows]
    b, lmin, lmax = len(rows), min(lens), max(lens)
    if lmin == 0:
        raise ConfigError("every prompt needs at least one token")
    if lmax + max_new_tokens > model.cfg.max_seq_len:
        raise ConfigError(
            f"prompt of {lmax} tokens + max_new_tokens={max_new_tokens} exceeds model.max_seq_len="
            f"{model.cfg.max_seq_len}; shorten the prompt or lower max_new_tokens"
        )
    if not use_cache and lmin != lmax:
        raise ConfigError("use_cache=False needs prompts of equal length")
    padded = torch.zeros(b, lmax, dtype=rows[0].dtype, device=rows[0].device)
    for i, r in enumerate(rows):
        padded[i, : lens[i]] = r  # right padding, never fed: a row's prompt tokens past L_min go in one by one
    length = torch.tensor(lens, device=padded.device)
    out = Generation(
        tokens=padded,
        new_tokens=[[] for _ in range(b)],
        stopped=[False] * b,
        stop_hit=[False] * b,
        prompt_tokens=sum(lens),
    )
    cache = model.new_cache(b, lmax + max_new_tokens, cache_dtype) if use_cache and max_new_tokens > 0 else None
    step_input, pos, start = padded[:, :lmin], lmin, time.perf_counter()
    for step in range(lmax - lmin + max_new_tokens if max_new_tokens > 0 else 0):
        logits = model(step_input, cache) if use_cache else model(out.tokens)
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        if step == 0:
            out.prefill_s = time.perf_counter() - start
        if stop_token is not None:
            stopped = torch.tensor(out.stop_hit, device=nxt.device)
            nxt = torch.where(stopped, torch.full_like(nxt, stop_token), nxt)
        out.steps += 1
        for row, tok in enumerate(nxt.tolist()):
            if pos < lens[row] or out.stopped[row]:
                continue
            if stop_token is not None and tok == stop_token:
                out.stopped[row] = out.stop_hit[row] = True
                continue
            if len(out.new_tokens[row]) < max_new_tokens:
                out.new_tokens[row].append(tok)
                if should_stop is not None and should_stop(row, out.new_tokens[row]):
                    out.stopped[row] = True
        if pos < lmax:
            nxt = torch.where(pos < length, padded[:, pos], nxt)
        out.tokens = torch.cat([out.tokens, nxt[:, None]], dim=1) if lmin == lmax else None
        step_input, pos = nxt[:, None], pos + 1
        finished = [out.stopped[i] or len(out.new_tokens[i]) >= max_new_tokens for i in range(b)]
        if all(finished):
            break
    out.decode_s = time.perf_counter() - start - out.prefill_s
    return out
