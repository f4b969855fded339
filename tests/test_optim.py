"""Optimizers, schedules, activation checkpointing and torch.compile give the intended numbers."""

import math
import time

import pytest
import torch
from helpers import KINDS, random_model, tiny_config

from lrkv import ConfigError, Transformer
from lrkv.training.optim import MuonAdamW, build_optimizer, lr_factor, newton_schulz, param_groups


def test_cosine_and_wsd_schedules():
    cos = dict(schedule="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, **cos) == pytest.approx(0.1) and lr_factor(9, **cos) == pytest.approx(1.0)
    assert lr_factor(60, **cos) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_factor(110, **cos) == pytest.approx(0.1) and lr_factor(500, **cos) == pytest.approx(0.1)
    wsd = dict(schedule="wsd", warmup_steps=10, total_steps=100, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, **wsd) == 1.0 and lr_factor(79, **wsd) == 1.0
    assert lr_factor(90, **wsd) == pytest.approx(0.5) and lr_factor(100, **wsd) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="optim.schedule='linear'"):
        lr_factor(20, schedule="linear", warmup_steps=10, total_steps=100)


def test_newton_schulz_orthogonalises():
    g = torch.randn(3, 48, 32, dtype=torch.float64)  # batched (e.g. LRKV's per-head B), tall
    o = newton_schulz(g, steps=5)
    singular = torch.linalg.svdvals(o)
    assert singular.min() > 0.6 and singular.max() < 1.25  # Muon's quintic lands near 1, not exactly
    # the orthogonal factor keeps the singular vectors: o ~ U V^T
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), o.flatten(), dim=0) > 0.95


def test_adamw_groups_equal_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ours = MuonAdamW([dict(params=[a], lr=0.01, weight_decay=0.1)], betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(5):
        g = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_paper_split_puts_matrices_in_muon_and_scales_adam_lrs():
    model = Transformer(tiny_config("lrkv", d_model=192))
    groups = {
        g["name"]: g
        for g in param_groups(
            model,
            matrix_lr=0.02,
            embed_lr=0.2,
            head_lr=0.004,
            scalar_lr=0.004,
            weight_decay=0.0,
            muon=True,
            width_scale=True,
        )
    }
    assert groups["matrix"]["use_muon"] and not groups["embed"].get("use_muon")
    assert groups["embed"]["lr"] == pytest.approx(0.2 * (192 / 768) ** -0.5)
    assert groups["head"]["lr"] == pytest.approx(0.004 * 2.0)
    n_matrix = sum(p.numel() for p in groups["matrix"]["params"])
    assert n_matrix == sum(p.numel() for p in model.blocks.parameters() if p.dim() >= 2)
    assert any(p.dim() == 3 for p in groups["matrix"]["params"])  # LRKV's per-head B matrices, batched in Muon
    with pytest.raises(ConfigError, match="optim.name='sgd'"):
        build_optimizer(model, {"name": "sgd"})


def test_muon_training_step_lowers_the_loss():
    model = random_model("lrkv")
    model.train()
    opt = build_optimizer(
        model,
        dict(
            name="muon",
            matrix_lr=0.02,
            embed_lr=0.05,
            head_lr=0.004,
            scalar_lr=0.004,
            betas=[0.9, 0.95],
            eps=1e-8,
            weight_decay=0.0,
        ),
    )
    x = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model.loss(x, x.roll(-1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5


def grads_of(model, x):
    model.zero_grad()
    loss = model.loss(x, x.roll(-1, 1))
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients():
    model = random_model("mla").train()
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    loss, grads = grads_of(model, x)
    model.activation_checkpointing = True
    loss_ac, grads_ac = grads_of(model, x)
    assert loss_ac == loss
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], atol=1e-6, rtol=0)


def test_compiled_blocks_match_eager():
    model = random_model("lrkv").train()
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    loss, grads = grads_of(model, x)
    for block in model.blocks:
        block.compile()
    start = time.time()
    loss_c, grads_c = grads_of(model, x)
    assert math.isclose(loss_c, loss, abs_tol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=1e-4, rtol=1e-4)
    assert time.time() - start < 300


def test_newton_schulz_flops_match_a_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from lrkv.training.optim import newton_schulz_flops

    for shape in [(24, 40), (40, 24), (3, 16, 8)]:  # wide, tall (transposed), batched
        with FlopCounterMode(display=False) as counter:
            newton_schulz(torch.randn(shape), steps=5)
        assert counter.get_total_flops() == newton_schulz_flops(shape, steps=5)


def test_owners_balance_newton_schulz_flops_and_shards_follow_torch_chunk():
    from lrkv.training.optim import assign_owners, newton_schulz_flops, shard_rows

    shapes = [(64, 64)] * 6 + [(256, 64)] * 4 + [(4, 16, 64)] * 3  # attention, MLP, LRKV-like batched matrices
    owners = assign_owners(shapes, world=4)
    assert assign_owners(shapes, world=4) == owners  # every rank computes the same assignment
    loads = [sum(newton_schulz_flops(s) for s, o in zip(shapes, owners) if o == r) for r in range(4)]
    assert max(loads) - min(loads) <= max(newton_schulz_flops(s) for s in shapes)  # greedy: within one matrix
    assert sum(loads) == sum(newton_schulz_flops(s) for s in shapes)
    for rows, world in [(10, 4), (7, 8), (4096, 8), (3, 2)]:
        expected = [len(c) for c in torch.arange(rows).chunk(world)]
        assert shard_rows(rows, world) == expected + [0] * (world - len(expected))


@pytest.mark.slow
def test_owner_muon_on_two_processes_equals_gather_and_single_process(tmp_path):
    """2 gloo processes, FSDP2-sharded lrkv model with uneven shards: owner scheme == gather == one process."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "result.json"
    code = (
        "import json, sys; from bench import muon_dist; "
        "r = muon_dist.main(['--layers', '1', '--d-model', '75', '--iters', '2', '--project', 'mha_6b3']); "
        f"open({str(out)!r}, 'w').write(json.dumps(r))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["max_abs_diff_owner_vs_gather"] == 0.0
    assert result["max_abs_diff_owner_vs_single"] < 1e-6
    rows = {r["scheme"]: r for r in result["rows"]}
    assert rows["owner"]["muon_bytes_per_rank"] > 0 and rows["gather"]["muon_bytes_per_rank"] > 0
    projection = result["projections"][0]
    assert projection["ns_flops_per_gpu_gather"] == pytest.approx(6.6e14, rel=0.02)  # 6b3, one step, every rank
    assert 7.5 < projection["reduction"] <= 8.0  # 8 GPUs: each runs about 1/8 of it


@pytest.mark.parametrize("kind, extra", [(k, {}) for k in KINDS] + [("lrkv", {"lrkv_impl": "folded"})])
def test_every_kind_block_compiles_without_graph_breaks(kind, extra, one_thread):
    """torch.compile traces a training block of each kind as one graph (dynamo only: cheap, no inductor)."""
    torch._dynamo.reset()
    model = random_model(kind, **extra).train()
    x = torch.randn(2, 16, model.cfg.d_model, requires_grad=True)
    explanation = torch._dynamo.explain(model.blocks[0])(x, None, torch.arange(16))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1
