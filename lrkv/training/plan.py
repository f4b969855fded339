"""Dry run and per-device memory plan: what a run will need, before it touches data or a GPU.

    python train.py <overrides> train.dry_run=true       # prints the plan, exits 0
    python train.py trainer=fsdp trainer.devices=8 model=mha_6b3 train.dry_run=true   # plans on a laptop

The model is built on the meta device (no memory). Per device, in GiB:

- parameters, gradients: N x 4 bytes (fp32 master weights and fp32 gradients, as Lightning's
  bf16-mixed and FSDP2's MixedPrecisionPolicy keep them), divided by the number of processes under FSDP;
- optimizer states: Muon keeps one momentum per block matrix (4 bytes), AdamW two moments (8 bytes)
  per parameter of its groups; sharded like the parameters under FSDP;
- working copies: bf16-mixed autocast caches a bf16 copy of every weight for the step (2N bytes); FSDP
  holds the gathered low-precision parameters of two blocks (the current one and the prefetched one)
  plus the unsharded embedding and head, and one block's unsharded gradients before reduce-scatter;
- activations per micro-batch: the bytes autograd saves for backward in one forward pass, counted by
  running the forward on the meta device under a saved-tensor hook (tensors that share storage counted
  once, parameters not counted; attention counted as a fused kernel saves it: q, k, v, output and
  the log-sum-exp, never the T x T scores), plus the gradient of the float32 logits, which is alive
  together with all of them when backward starts. With activation checkpointing: each block keeps
  only its input, and one block's activations are rebuilt at a time during backward.

`total` = parameters + gradients + optimizer states + working copies + activations (with or without
checkpointing, as `train.activation_checkpointing` chooses). It is an upper bound of the live tensors:
gradients grow while activations are freed during backward. It excludes the CUDA context and the
allocator's cache and fragmentation (a few GiB on a GPU). tests/test_plan.py checks it against the
peak of live tensor bytes of a real CPU training step (within 20%).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lrkv.config import ModelConfig
from lrkv.errors import ConfigError
from lrkv.model import Transformer

GiB = 2**30


@dataclass
class Plan:
    """A per-device memory plan (bytes) with the run's batch arithmetic."""

    model: ModelConfig
    strategy: str
    world: int
    precision: str
    micro_batch: int
    seq_len: int
    accumulate: int
    batch_tokens: int
    steps: int
    params: int
    checkpointing: bool
    limit_gib: float
    memory: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Peak of the two phases: backward starting (activations alive) and optimizer step (gradients alive)."""
        m = self.memory
        backward = m["working copies"] + self.activation() + m["logits gradients"]
        if self.accumulate > 1:  # gradients of earlier micro-batches stay alive through later backwards
            backward += m["gradients"]
        return m["parameters"] + m["optimizer states"] + max(backward, m["gradients"])

    def fits(self) -> bool:
        return self.total <= self.limit_gib * GiB

    def suggestion(self) -> str:
        """What to change when the plan exceeds the device memory (empty when it fits)."""
        if self.fits():
            return ""
        limit = self.limit_gib * GiB
        others = self.total - self.activation()  # (when the backward phase is the peak)
        if not self.checkpointing and others + self.memory["activations (checkpointing)"] <= limit:
            return "train.activation_checkpointing=true"
        per_sample = self.activation() / self.micro_batch
        fitting = int((limit - others) // per_sample) if per_sample > 0 and limit > others else 0
        if 1 <= fitting < self.micro_batch:
            return f"data.batch_size={fitting} (train.batch_tokens stays; accumulation grows)"
        if self.strategy != "fsdp":
            return "trainer=fsdp (shard parameters, gradients and optimizer states over the GPUs)"
        return "more GPUs (trainer.devices / trainer.num_nodes) or a smaller model"

    def activation(self) -> float:
        return self.memory["activations (checkpointing)" if self.checkpointing else "activations"]

    def warning(self) -> str:
        return (
            f"memory plan: {self.total / GiB:.1f} GiB per device exceeds train.device_memory_gib={self.limit_gib:g}; "
            f"try {self.suggestion()}"
        )

    def report(self) -> str:
        m = self.model
        lines = [
            f"dry run: {m.name} ({m.attention}), {m.n_layer} layers x {m.d_model}, vocabulary {m.vocab_size}: "
            f"{self.params:,} parameters ({self.params / 1e6:.1f}M)",
            f"batch: micro batch {self.micro_batch} x {self.seq_len} tokens x {self.world} process(es), "
            f"accumulation {self.accumulate} -> {self.batch_tokens:,} tokens per optimizer step; {self.steps:,} steps "
            f"= {self.steps * self.batch_tokens:,} tokens",
            f"memory per device (GiB), strategy {self.strategy}, precision {self.precision}:",
        ]
        for key, value in self.memory.items():
            chosen = key == ("activations (checkpointing)" if self.checkpointing else "activations")
            note = "  <- counted" if chosen else ("  (not counted)" if key.startswith("activations") else "")
            lines.append(f"  {key:<30} {value / GiB:9.3f}{note}")
        lines.append(f"  {'total':<30} {self.total / GiB:9.3f}   (device: {self.limit_gib:g} GiB)")
        if not self.fits():
            lines.append(self.warning())
        return "\n".join(lines)


# ---- activations ----------------------------------------------------------------------------------
class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA on the meta device: saves what a fused (flash) kernel saves."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run (the plan does no backward)
        raise NotImplementedError


class _FusedSDPA(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _FusedAttention.apply(*args[:3])
        return func(*args, **(kwargs or {}))


@contextmanager
def _saved_bytes(model: Transformer, per_block: list[int], other: list[int]):
    """Count bytes autograd saves, per block (forward pre-hooks mark the current block) and outside blocks."""
    skip = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    current = [None]
    hooks = [
        b.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)) for i, b in enumerate(model.blocks)
    ]
    hooks += [b.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)) for b in model.blocks]

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip and storage._cdata not in seen:
            seen.add(storage._cdata)
            if current[0] is None:
                other[0] += storage.nbytes()
            else:
                per_block[current[0]] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for h in hooks:
            h.remove()


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Bytes saved for backward by one micro-batch without and with activation checkpointing, and the bytes of
    the gradients alive at the start of backward besides them: backward through the cross-entropy, the
    log-softmax and the soft-cap holds three float32 B x T x vocab tensors at once (measured on CPU)."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.train()
    tokens = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    per_block, other = [0] * cfg.n_layer, [0]
    with _saved_bytes(model, per_block, other), _FusedSDPA():
        logits = model(tokens)
    block_input = micro_batch * seq_len * cfg.d_model * torch.empty((), dtype=dtype).element_size()
    plain = other[0] + sum(per_block)
    checkpointed = other[0] + cfg.n_layer * block_input + max(per_block, default=0)
    return plain, checkpointed, 3 * logits.numel() * 4


# ---- the plan -------------------------------------------------------------------------------------
def optimizer_state_bytes(model: Transformer, optim: dict) -> int:
    """Muon: one fp32 momentum per block matrix; AdamW: two fp32 moments per parameter of its groups."""
    muon = optim.get("name") == "muon"
    total = 0
    for name, p in model.named_parameters():
        in_muon = muon and name.startswith("blocks.") and p.dim() >= 2
        total += p.numel() * (4 if in_muon else 8)
    return total


# ---- batch arithmetic (also used by lrkv.training.run) -------------------------------------------------
def world_size_of(trainer_cfg: dict) -> int:
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1))
    if devices in ("auto", -1, "-1"):
        devices = (
            torch.cuda.device_count() if trainer_cfg.get("accelerator") != "cpu" and torch.cuda.is_available() else 1
        )
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    return int(devices) * nodes


def batch_plan(train_cfg: dict, micro_batch: int, seq_len: int, world: int) -> tuple[int, int, int]:
    """(gradient accumulation, global tokens per optimizer step, optimizer steps)."""
    micro_tokens = micro_batch * seq_len * world
    batch_tokens = train_cfg.get("batch_tokens") or micro_tokens
    if batch_tokens % micro_tokens:
        raise ConfigError(
            f"train.batch_tokens={batch_tokens} is not a multiple of data.batch_size x data.seq_len x devices = "
            f"{micro_batch} x {seq_len} x {world} = {micro_tokens}; "
            f"set train.batch_tokens to a multiple of {micro_tokens}"
        )
    accumulate = batch_tokens // micro_tokens
    if train_cfg.get("max_tokens"):
        steps = -(-int(train_cfg["max_tokens"]) // batch_tokens)
    elif train_cfg.get("max_steps"):
        steps = int(train_cfg["max_steps"])
    else:
        raise ConfigError("set train.max_steps or train.max_tokens (the training budget)")
    return accumulate, batch_tokens, steps


def make_plan(cfg: dict, model_cfg: ModelConfig | None = None) -> Plan:
    """The memory plan of a composed train config (what train.py passes to lrkv.training.run.train)."""
    from lrkv.data.tokenizer import padded_vocab_size

    train_cfg, trainer_cfg, data = dict(cfg["train"]), dict(cfg["trainer"]), dict(cfg["data"])
    if model_cfg is None:
        fields = dict(cfg["model"])
        tok = dict(cfg.get("tokenizer") or {})
        if train_cfg.get("vocab_from_tokenizer", True) and tok.get("kind", "bpe") == "bpe" and tok.get("vocab_size"):
            fields["vocab_size"] = padded_vocab_size(int(tok["vocab_size"]))  # the BPE is trained to this size
        model_cfg = ModelConfig.from_dict(fields)
    world = world_size_of(trainer_cfg)
    strategy = trainer_cfg.get("strategy", "auto")
    micro, seq_len = int(data["batch_size"]), int(data["seq_len"])
    accumulate, batch_tokens, steps = batch_plan(train_cfg, micro, seq_len, world)
    precision = str(trainer_cfg.get("precision", "auto"))
    if precision == "auto":
        on_gpu = trainer_cfg.get("accelerator", "auto") != "cpu" and torch.cuda.is_available()
        precision = "bf16-mixed" if on_gpu else "32-true"
    low = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None

    with torch.device("meta"):
        model = Transformer(model_cfg)
    n = model.num_params()
    shards = world if strategy == "fsdp" else 1
    memory = {
        "parameters": 4 * n / shards,
        "gradients": 4 * n / shards,
        "optimizer states": optimizer_state_bytes(model, dict(cfg["optim"])) / shards,
    }
    memory["working copies"] = 0
    if strategy == "fsdp":  # gathered blocks (current + prefetched), embedding and head; one block's gradients
        size = 2 if low is not None else 4
        block = max((sum(p.numel() for p in b.parameters()) for b in model.blocks), default=0)
        outside = n - sum(p.numel() for p in model.blocks.parameters())
        memory["working copies"] = (2 * block + outside) * size + block * 4
    elif low is not None:  # autocast's low-precision copy of every weight, saved for backward
        memory["working copies"] = 2 * n
    plain, checkpointed, logits_grad = activation_bytes(model_cfg, micro, seq_len, low or torch.float32)
    memory["activations"] = plain
    memory["activations (checkpointing)"] = checkpointed
    memory["logits gradients"] = logits_grad
    return Plan(
        model=model_cfg,
        strategy="fsdp" if strategy == "fsdp" else ("ddp" if world > 1 else "single device"),
        world=world,
        precision=precision,
        micro_batch=micro,
        seq_len=seq_len,
        accumulate=accumulate,
        batch_tokens=batch_tokens,
        steps=steps,
        params=n,
        checkpointing=bool(train_cfg.get("activation_checkpointing", False)),
        limit_gib=float(train_cfg.get("device_memory_gib") or 80),
        memory=memory,
    )


def dry_run(cfg: dict) -> None:
    """Print the plan (and a suggestion when it does not fit); touches no data and no GPU."""
    print(make_plan(cfg).report())


def warn_if_too_big(cfg: dict, model_cfg: ModelConfig) -> Plan | None:
    """Before a real launch allocates: the plan's one-line warning when it exceeds the device memory."""
    try:
        plan = make_plan(cfg, model_cfg)
    except Exception as e:  # noqa: BLE001 - the plan is advice: a model it cannot trace still trains
        print(f"warning: no memory plan ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None
    if not plan.fits():
        print(f"warning: {plan.warning()}")
    return plan


def measure_peak_bytes(fn) -> int:
    """Peak bytes of live tensors created while fn() runs (CPU or GPU), on top of those alive before.

    A TorchDispatchMode notes every op's output storage and drops it when its storage is freed, the
    way torch.cuda.max_memory_allocated counts a GPU's live allocations. Slow: for tests on tiny models.
    """
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    live: dict[int, tuple[StorageWeakRef, int]] = {}
    state = {"now": 0, "peak": 0}

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for key in [k for k, (ref, _) in live.items() if ref.expired()]:
                state["now"] -= live.pop(key)[1]
            inputs = {
                a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
            }
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storage = t.untyped_storage()
                    if storage._cdata not in live and storage._cdata not in inputs:  # new, not in-place or a view
                        live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                        state["now"] += storage.nbytes()
            state["peak"] = max(state["peak"], state["now"])
            return out

    with Track():
        fn()
    return state["peak"]
