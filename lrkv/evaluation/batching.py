"""`batch_size=auto`: the largest evaluation batch that fits in memory.

The worst case for one batch of lm-eval requests is B rows of max_length tokens: a scoring forward
(logits B x max_length x vocab) or a generation prefill of B prompts into a KV cache of max_length.

- On CUDA the batch is found by trying it (lm-eval's HF model and accelerate's
  find_executable_batch_size do the same): run the worst case at `max_batch_size`, halve on
  out-of-memory until one runs. What runs at max_length runs for every shorter request.
- On CPU running out of memory does not raise (the kernel kills the process), so B comes from an
  estimate of the bytes one row keeps alive at its peak (`row_bytes`) against half of the memory the
  OS reports as available, rounded down to a power of two and capped at `max_batch_size`.

`auto:N` (lm-eval's syntax for re-detecting N times) is accepted and detects once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from lrkv.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64


def parse_batch_size(value) -> int | None:
    """An int >= 1, or None for "auto" / "auto:N"; anything else is a one-line ConfigError."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "auto" or text.startswith("auto:"):
        return None
    try:
        size = int(text)
    except ValueError:
        raise ConfigError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise ConfigError(f"batch_size must be >= 1 or 'auto', got {value!r}")
    return size


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def largest_that_runs(attempt: Callable[[int], None], start: int) -> int:
    """The first of start, start/2, ..., 1 for which attempt(B) does not run out of memory."""
    batch = max(1, int(start))
    while True:
        try:
            attempt(batch)
            return batch
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(e):
                raise
            if batch == 1:
                raise ConfigError(
                    "batch_size=auto: one row of max_length tokens does not fit in memory; "
                    "lower lm_eval.max_length or use a smaller dtype"
                ) from None
            batch //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def row_bytes(cfg, length: int, element_bytes: int) -> int:
    """Estimated bytes one row of `length` tokens keeps alive at the peak of an inference forward.

    Logits (length x vocab), and inside a layer the residual stream, its normed copy, queries, keys,
    values and attention output (~6 x d_model), the MLP's hidden activation twice (before and after the
    nonlinearity; three times for swiglu), plus this row's KV cache when generating (every layer).
    Doubled for the allocator's slack and temporaries this does not name.
    """
    d_ff = int(cfg.mlp_ratio * cfg.d_model)
    mlp = (3 if cfg.mlp_act == "swiglu" else 2) * d_ff
    per_token = cfg.vocab_size + 6 * max(cfg.d_model, cfg.n_head * cfg.head_dim) + mlp
    kv = cfg.kv_cache_bytes_per_token(torch.float32) // 4 * element_bytes
    return 2 * length * (per_token * element_bytes + kv)


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else physical memory from sysconf."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimated_batch(cfg, length: int, element_bytes: int, memory_bytes: int, max_batch_size: int) -> int:
    """Largest power of two <= max_batch_size whose estimated rows fit in half of memory_bytes (>= 1)."""
    fits = max(1, (memory_bytes // 2) // row_bytes(cfg, length, element_bytes))
    batch = 1
    while batch * 2 <= min(fits, max_batch_size):
        batch *= 2
    return batch


@torch.no_grad()
def auto_batch_size(model, max_length: int, *, max_batch_size: int | None = None, generate: bool = True) -> int:
    """The batch for `batch_size=auto` (see the module docstring); logs how it was chosen."""
    max_batch_size = int(max_batch_size or DEFAULT_MAX_BATCH)
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
    param = next(model.parameters())
    if param.device.type != "cuda":
        memory = available_memory_bytes()
        batch = estimated_batch(model.cfg, max_length, param.element_size(), memory, max_batch_size)
        log.info("batch_size=auto: %d (estimate against %.1f GiB available, CPU)", batch, memory / 2**30)
        return batch

    from lrkv.generate import generate_batch

    def attempt(b: int) -> None:
        tokens = torch.zeros(b, max_length, dtype=torch.long, device=param.device)
        model(tokens)
        if generate:
            generate_batch(model, tokens[:, :-1], 1)
        torch.cuda.synchronize(param.device)

    batch = largest_that_runs(attempt, max_batch_size)
    torch.cuda.empty_cache()
    log.info(
        "batch_size=auto: %d (largest of %d, %d/2, ... that ran at %d tokens)",
        batch,
        max_batch_size,
        max_batch_size,
        max_length,
    )
    return batch
