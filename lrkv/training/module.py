"""The LightningModule: wraps a Transformer for next-token training (single device or FSDP2).

The model is built in `configure_model` on the meta device and materialised part by part on the
CPU with a seeded init (`Transformer.init_plan`), then optionally compiled per block and sharded
per block with FSDP2 `fully_shard` (Lightning's ModelParallelStrategy provides the device mesh).
Built that way, the initial weights do not depend on the number of processes, which is what lets
the tests compare an FSDP run with a single-process run.
"""

from __future__ import annotations

import math
import random
import warnings

import lightning as L
import torch

from lrkv.config import ModelConfig
from lrkv.measure import loss_sums
from lrkv.model import Transformer, seeded
from lrkv.training import step
from lrkv.training.optim import build_optimizer, lr_factor

# validation metrics are summed over ranks by hand below before they are logged
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


def build_model(
    cfg: ModelConfig,
    seed: int,
    *,
    mesh=None,
    compile: bool = False,
    activation_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
) -> Transformer:
    """Meta-device build, per-part CPU materialisation with seeded init, then compile / FSDP2 sharding."""
    with torch.device("meta"):
        model = Transformer(cfg)
    for i, (modules, init) in enumerate(model.init_plan()):
        for module in modules:
            module.to_empty(device="cpu")
        seeded(init, seed + i)
    model.activation_checkpointing = activation_checkpointing
    if compile:
        for block in model.blocks:
            block.compile()
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if mesh.device_type == "cpu":  # gloo's AVG reduction is buggy (pytorch#162338): sum, then divide
            model.set_force_sum_reduction_for_comms(True)
    return model


class LanguageModel(L.LightningModule):
    """Next-token cross-entropy training of `Transformer(ModelConfig(**model))`.

    optim: the `optim` config (see configs/optim/*.yaml); schedule over `total_steps` optimizer steps.
    """

    def __init__(
        self,
        model: dict,
        optim: dict,
        total_steps: int,
        seed: int = 0,
        compile: bool = False,
        activation_checkpointing: bool = False,
        fsdp_param_dtype: str | None = None,
        batch_tokens: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()  # plain dicts: the checkpoint stays loadable with weights_only=True
        self.model_cfg = ModelConfig.from_dict(dict(model))
        self.model: Transformer | None = None
        self.token_bytes: torch.Tensor | None = None  # bytes of each token id, for bits-per-byte
        self.step_loss_sum: torch.Tensor | None = None  # this optimizer step's micro-batch losses (device)
        self.step_micro_batches = 0
        self.last_loss: float | None = None  # the previous step's mean loss and gradient norm (host)
        self.last_grad_norm: float | None = None
        self._val_sums: torch.Tensor | None = None
        self._val_by_source: torch.Tensor | None = None  # data=mixture: (sources, 3) sums

    # ---- model --------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        mesh = getattr(self, "_device_mesh", None)
        if (
            mesh is not None
        ):  # ModelParallelStrategy's mesh is (data_parallel, tensor_parallel): shard over data_parallel
            mesh = mesh["data_parallel"]
        hp = self.hparams
        dtype = {"bf16": torch.bfloat16, "fp32": None, None: None}[hp.fsdp_param_dtype]
        self.model = build_model(
            self.model_cfg,
            hp.seed,
            mesh=mesh,
            compile=hp.compile,
            activation_checkpointing=hp.activation_checkpointing,
            param_dtype=dtype,
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "token_bytes", None) is not None:
            self.token_bytes = datamodule.token_bytes

    # ---- steps (the order of one optimizer step: lrkv/training/step.py) -------------------------
    def training_step(self, batch, batch_idx):
        loss = self.model.loss(batch["input"], batch["target"])
        step.add_micro_batch_loss(self, loss)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        step.clip_and_check(self, self.hparams.optim.get("grad_clip"))

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """CUDA: the DataLoader pins the batch (run.make_datamodule), the copy does not block the host."""
        if device.type == "cuda" and isinstance(batch, dict):
            return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def validation_step(self, batch, batch_idx):
        sums = loss_sums(self.model, batch, self.token_bytes).detach()  # [nats, tokens, bytes], lrkv/measure.py
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums
        if "source" in batch:  # data=mixture: every validation batch comes from one source (lrkv/data/mixture.py)
            from lrkv.data.mixture import add_source_sums

            names = self.trainer.datamodule.mixture.names
            self._val_by_source = add_source_sums(self._val_by_source, len(names), int(batch["source"][0]), sums)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = self._val_by_source = None

    def on_validation_epoch_end(self) -> None:
        sums = self._val_sums if self._val_sums is not None else torch.zeros(3, dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        nats, tokens, nbytes = (float(x) for x in sums)
        if tokens == 0:
            return
        metrics = {"val_loss": nats / tokens}
        if nbytes > 0:
            metrics["val_bpb"] = nats / (math.log(2) * nbytes)
        mixture = getattr(getattr(self.trainer, "datamodule", None), "mixture", None)
        if mixture is not None:  # val_loss/<name>, val_bpb/<name>
            from lrkv.data.mixture import source_metrics

            by_source = self._val_by_source
            if by_source is None:
                by_source = torch.zeros(len(mixture.names), 3, dtype=torch.float64, device=self.device)
            if self.trainer.world_size > 1:
                by_source = self.trainer.strategy.reduce(by_source, reduce_op="sum")
            metrics.update(source_metrics(by_source, mixture.names))
        self.log_dict(metrics, prog_bar=True, logger=False, sync_dist=False, rank_zero_only=False)
        self.val_metrics = metrics

    # ---- optimizer ----------------------------------------------------------------------------
    def lr_schedule(self) -> dict:
        optim = dict(self.hparams.optim)
        return dict(
            schedule=optim.get("schedule", "cosine"),
            warmup_steps=int(optim.get("warmup_steps", 0)),
            total_steps=int(self.hparams.total_steps),
            min_lr_ratio=float(optim.get("min_lr_ratio", 0.0)),
            decay_fraction=float(optim.get("decay_fraction", 0.2)),
        )

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, dict(self.hparams.optim))
        schedule = self.lr_schedule()
        lr_factor(0, **schedule)  # validates the schedule name early
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(**schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path:  # resumed: this run's budget and optim values apply (training/settings.py)
            from lrkv.training.settings import apply_optim_settings

            scheduler = self.trainer.lr_scheduler_configs[0].scheduler
            apply_optim_settings(self, self.trainer.optimizers[0], scheduler)

    # ---- RNG state in checkpoints ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": list_state(random.getstate())}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(tuple_state(rng["python"]))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])


class LRFactor:
    """Picklable-free schedule: LambdaLR stores a callable object's __dict__ (plain numbers) in its state."""

    def __init__(self, **schedule):
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        return lr_factor(step, **self.schedule)


def list_state(state):
    """random.getstate() as nested lists (weights_only-safe)."""
    return [state[0], list(state[1]), state[2]]


def tuple_state(state):
    return (state[0], tuple(state[1]), state[2])
