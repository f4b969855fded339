"""The dry run and memory plan: batch arithmetic, a plan that matches a measured CPU peak, suggestions, CLI."""

import pytest
import torch
from train_helpers import compose_train, run_script

from lrkv import ModelConfig, Transformer
from lrkv.training.optim import build_optimizer
from lrkv.training.plan import make_plan, measure_peak_bytes


def plan_for(*overrides):
    cfg = compose_train(["model=mha_tiny", "train.max_steps=10", *overrides])
    return cfg, make_plan(cfg)


def test_plan_has_the_batch_arithmetic_and_shards_states_under_fsdp():
    cfg, single = plan_for("data.batch_size=4", "data.seq_len=128", "train.batch_tokens=4096")
    assert (single.accumulate, single.batch_tokens, single.steps, single.world) == (8, 4096, 10, 1)
    assert single.params == Transformer(ModelConfig.from_dict({**cfg["model"], "vocab_size": 4096})).num_params()
    _, fsdp = plan_for(
        "trainer=fsdp", "trainer.devices=8", "data.batch_size=4", "data.seq_len=128", "train.batch_tokens=4096"
    )
    assert (fsdp.world, fsdp.accumulate, fsdp.strategy) == (8, 1, "fsdp")
    for key in ("parameters", "gradients", "optimizer states"):
        assert fsdp.memory[key] == pytest.approx(single.memory[key] / 8)
    assert fsdp.memory["activations"] < single.memory["activations"]  # bf16 on the GPUs vs fp32 on the CPU
    assert single.memory["activations (checkpointing)"] < single.memory["activations"]


@pytest.mark.parametrize(
    "model, batch, seq, checkpointing",
    [("mha_tiny", 8, 256, False), ("lrkv_tiny", 4, 256, False), ("mla_tiny", 4, 128, True)],
)
def test_plan_is_within_20_percent_of_a_measured_cpu_step(model, batch, seq, checkpointing, one_thread):
    """Peak bytes of live tensors in a real training step (fp32, CPU; the second step, optimizer states
    alive) against the plan's total."""
    cfg, plan = plan_for(
        f"model={model}",
        f"data.batch_size={batch}",
        f"data.seq_len={seq}",
        f"train.batch_tokens={batch * seq}",
        f"train.activation_checkpointing={checkpointing}",
        "trainer=cpu",
    )
    torch.manual_seed(0)
    model = Transformer(plan.model).train()
    model.activation_checkpointing = checkpointing
    optimizer = build_optimizer(model, cfg["optim"])
    x = torch.randint(0, plan.model.vocab_size, (batch, seq))

    def step():
        model.loss(x, x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    before += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    measured = before + measure_peak_bytes(step)
    assert plan.total == pytest.approx(measured, rel=0.2)


def test_suggestions_when_the_plan_does_not_fit():
    _, plan = plan_for("data.batch_size=16", "data.seq_len=256", "train.batch_tokens=4096", "trainer=cpu")
    plan.limit_gib = (plan.total - plan.activation() + plan.memory["activations (checkpointing)"] * 1.01) / 2**30
    assert not plan.fits() and plan.suggestion() == "train.activation_checkpointing=true"
    assert "exceeds train.device_memory_gib" in plan.warning() and plan.warning() in plan.report()
    plan.checkpointing = True
    plan.limit_gib = (plan.total - plan.activation() / 2) / 2**30
    assert plan.suggestion().startswith("data.batch_size=")
    assert 1 <= int(plan.suggestion().split("=")[1].split()[0]) < 16


@pytest.mark.slow
def test_dry_run_plans_8_gpus_on_a_cpu_without_data(tmp_path):
    args = [
        "model=mha_6b3",
        "trainer=fsdp",
        "trainer.devices=8",
        "data.batch_size=4",
        "data.seq_len=2048",
        "train.batch_tokens=524288",
        "train.device_memory_gib=20",
        "train.dry_run=true",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    result = run_script(args, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "accumulation 8 -> 524,288 tokens per optimizer step" in out and "strategy fsdp" in out
    assert "total" in out and "try train.activation_checkpointing=true" in out  # 6b3 at 4 x 2048 with 20 GiB
    assert not (tmp_path / "cache").exists()  # no tokenizer trained, no data read


@pytest.mark.slow
def test_a_launch_over_the_device_memory_warns_before_training(tmp_path, capsys, one_thread):
    from train_helpers import tiny_overrides, train_in_process

    overrides = tiny_overrides(tmp_path / "out", tmp_path / "cache", steps=1, **{"train.device_memory_gib": 0.001})
    train_in_process(overrides, tmp_path / "run")
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines() if line.startswith("warning: memory plan:"))
    assert "exceeds train.device_memory_gib=0.001; try " in warning
    assert out.index("warning: memory plan:") < out.index(f"run {tmp_path / 'run'}")  # before the model is built
