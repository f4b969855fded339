"""Decoding: decoupled-RoPE LRKV, grouped (copy-free) GQA/MQA/MLA decode, backends and their errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import decode_in_chunks, random_model, tiny_config

from lrkv import ConfigError, ModelConfig
from lrkv.attention import kernel

ATOL = 1e-4


def tokens(b=2, t=20, seed=1, vocab=97):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- decoupled-RoPE LRKV (residual_rope=false) -----------------------------------------------------
@pytest.mark.parametrize("sizes", [[7] + [1] * 13, [5, 3, 1, 6, 5]])
@pytest.mark.parametrize("rank", [0, 5])
def test_decoupled_lrkv_cached_decode_equals_full_forward(sizes, rank):
    model, x = random_model("lrkv", seed=2, rank=rank, residual_rope=False), tokens(seed=3)
    with torch.no_grad():
        full = model(x)
        cached = decode_in_chunks(model, x, sizes)
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)


def test_decoupled_lrkv_is_a_different_model_that_agrees_without_residual_keys():
    exact = random_model("lrkv", seed=4)
    decoupled = random_model("lrkv", seed=4, residual_rope=False)
    decoupled.load_state_dict(exact.state_dict())  # same parameters
    x = tokens(seed=5)
    with torch.no_grad():
        assert (exact(x) - decoupled(x)).abs().max() > 1e-2  # the residual key carries no RoPE/norm: other scores
        for model in (exact, decoupled):
            for block in model.blocks:
                block.attn.bk.zero_()
        torch.testing.assert_close(decoupled(x), exact(x), atol=1e-5, rtol=0)  # shared keys only: the same model


def test_decoupled_lrkv_cache_bytes_equal_exact_lrkv():
    exact, decoupled = tiny_config("lrkv"), tiny_config("lrkv", residual_rope=False)
    assert decoupled.kv_cache_bytes_per_token() == exact.kv_cache_bytes_per_token()
    model = random_model("lrkv", residual_rope=False)
    cache = model.new_cache(2, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        model(tokens(t=9), cache)
    assert cache.nbytes_per_token() == exact.kv_cache_bytes_per_token(torch.bfloat16)


def test_decoupled_lrkv_generation_with_cache_equals_without():
    model, prompt = random_model("lrkv", residual_rope=False), tokens(t=5)
    with_cache = model.generate(prompt, max_new_tokens=10, cache_dtype=torch.float32)
    assert torch.equal(with_cache, model.generate(prompt, max_new_tokens=10, use_cache=False))


# ---- fast exact LRKV decode -----------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(norm_affine=True), dict(qk_norm=False), dict(rank=16, n_head=2)])
def test_exact_lrkv_decode_equals_full_forward_for_norm_variants(options):
    model, x = random_model("lrkv", seed=8, **options), tokens(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(decode_in_chunks(model, x, [4, 2] + [1] * 14), model(x), atol=ATOL, rtol=0)


def test_lrkv_torch_decode_with_bf16_cache_matches_float32_cache_closely():
    model, x = random_model("lrkv", seed=6), tokens(seed=7)
    with torch.no_grad():
        f32 = decode_in_chunks(model, x, [6] + [1] * 14)
        bf16 = decode_in_chunks(model, x, [6] + [1] * 14, cache_dtype=torch.bfloat16)
    assert 0 < (bf16 - f32).abs().max() < 0.1


def test_lrkv_rope_table_is_computed_once_and_grown():
    model = random_model("lrkv")
    attn = model.blocks[0].attn
    table = attn.rope_table(10, "cpu")
    assert attn.rope_table(8, "cpu").data_ptr() == table.data_ptr()  # reused, not recomputed
    longer = attn.rope_table(30, "cpu")
    from lrkv.rope import rope_cos_sin

    torch.testing.assert_close(longer, torch.cat(rope_cos_sin(torch.arange(30), attn.head_dim), -1), atol=0, rtol=0)


# ---- grouped decode without K/V expansion --------------------------------------------------------
@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("tq", [1, 3])
def test_grouped_decode_equals_expanded_attention(g, tq):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, tq, 4, 16, generator=gen)
    k, v = torch.randn(3, 11, g, 16, generator=gen), torch.randn(3, 11, g, 8, generator=gen)
    expected = kernel.attend(q, k.repeat_interleave(4 // g, 2), v.repeat_interleave(4 // g, 2), backend="sdpa")
    torch.testing.assert_close(kernel.grouped_decode(q, k, v), expected, atol=1e-5, rtol=0)
    assert kernel.uses_grouped_decode(q, k)


def test_mla_decodes_from_one_contiguous_latent_buffer():
    model = random_model("mla")
    cache = model.new_cache(2, 16, dtype=torch.float32)
    buffers = cache.layers[0].buffers
    assert list(buffers) == ["ckr"] and tuple(buffers["ckr"].shape) == (2, 16, 12 + 8)


# ---- batched prompts of different lengths ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["mha", "gqa", "mla", "lrkv"])
def test_generate_a_list_of_prompts_equals_one_by_one(kind):
    model = random_model(kind, seed=12)
    gen = torch.Generator().manual_seed(13)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in (5, 3, 5, 8)]
    alone = [model.generate(p, 9, cache_dtype=torch.float32) for p in prompts]
    stop = int(alone[0][7])  # a token the first prompt emits: its row stops early, the others may not
    alone_stop = [model.generate(p, 9, stop_token=stop, cache_dtype=torch.float32) for p in prompts]
    batched = model.generate(prompts, 9, cache_dtype=torch.float32)
    batched_stop = model.generate(prompts, 9, stop_token=stop, cache_dtype=torch.float32)
    assert isinstance(batched, list) and len(batched) == 4
    for a, b in zip(alone + alone_stop, batched + batched_stop):
        assert torch.equal(a, b)
    assert len(batched_stop[0]) == 5 + 3 and int(batched_stop[0][-1]) == stop


def test_evaluation_decode_of_ragged_prompts_equals_one_by_one():
    from lrkv.generate import generate_batch

    model = random_model("lrkv", seed=14)
    gen = torch.Generator().manual_seed(15)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in (6, 2, 4)]
    stop = lambda row, new: len(new) == 3 + row  # noqa: E731 - a different stop per row
    together = generate_batch(model, prompts, 8, should_stop=stop, cache_dtype=torch.float32)
    for i, p in enumerate(prompts):
        alone = generate_batch(
            model, p[None], 8, should_stop=lambda row, new, i=i: stop(i, new), cache_dtype=torch.float32
        )
        assert together.new_tokens[i] == alone.new_tokens[0] and len(alone.new_tokens[0]) == 3 + i


def test_prompt_longer_than_max_seq_len_is_a_one_line_error():
    model = random_model("mha")
    for prompt in (
        torch.zeros(60, dtype=torch.long),
        [torch.zeros(3, dtype=torch.long), torch.zeros(60, dtype=torch.long)],
    ):
        with pytest.raises(ConfigError) as err:
            model.generate(prompt, 10)
        assert "max_seq_len" in str(err.value) and "\n" not in str(err.value)


# ---- configuration errors ------------------------------------------------------------------------
BAD = [
    (dict(attention="lrkv", rank=4, decode_backend="cuda"), "decode_backend"),
    (dict(attention="mha", residual_rope=False), "residual_rope"),
    (dict(attention="mla", kv_latent=8, residual_rope=True), "residual_rope"),
    (dict(attention="lrkv", rank=4, residual_rope="no"), "residual_rope"),
    (dict(attention="mha", decode_backend="triton"), "decode_backend=triton"),
    (dict(attention="lrkv", rank=4, residual_rope=False, decode_backend="triton"), "decode_backend=triton"),
]


@pytest.mark.parametrize("fields,name", BAD)
def test_bad_decode_config_is_a_one_line_error_naming_the_field(fields, name):
    base = dict(n_layer=2, n_head=4, d_model=48, head_dim=16, vocab_size=97)
    with pytest.raises(ConfigError) as err:
        ModelConfig(**{**base, **fields})
    assert "\n" not in str(err.value) and name in str(err.value)


def test_triton_where_it_cannot_run_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, x = random_model("lrkv", decode_backend="triton"), tokens()
    cache = model.new_cache(2, 24, dtype=torch.float32)
    with torch.no_grad():
        model(x[:, :5], cache)  # prefill into an empty cache needs no decode kernel
        with pytest.raises(ConfigError) as err:
            model(x[:, 5:6], cache)
    assert "\n" not in str(err.value) and "triton" in str(err.value)


# ---- the fused Triton kernel, run by Triton's interpreter on CPU ----------------------------------
TRITON_CHECK = """
import torch
from helpers import decode_in_chunks, random_model

cases = [({}, torch.float32), (dict(norm_affine=True, rank=3), torch.float32), ({}, torch.bfloat16)]
for options, cache_dtype in cases:
    model = random_model("lrkv", seed=10, n_layer=1, **options)
    x = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(11))
    sizes = [12, 3, 1, 1, 2]  # 15..19 cached tokens: not multiples of the block of 4; 2 splits of 3 blocks
    with torch.no_grad():
        torch_path = decode_in_chunks(model, x, sizes, cache_dtype=cache_dtype)
        for block in model.blocks:
            block.attn.cfg.decode_backend = "triton"
            block.attn.triton_block_t, block.attn.triton_programs = 4, 16
        assert model.blocks[0].attn.decode_backend("cpu") == "triton"
        triton_path = decode_in_chunks(model, x, sizes, cache_dtype=cache_dtype)
    err = (triton_path - torch_path).abs().max().item()
    assert err < 1e-4, (options, cache_dtype, err)
    print("ok", options, cache_dtype, err)
"""


@pytest.mark.slow
def test_triton_kernel_equals_torch_decode_under_the_interpreter():
    """fp32 and bf16 caches, batch 2, affine norm, rank 3 (padded), several splits and blocks, partial blocks.

    A subprocess: Triton reads TRITON_INTERPRET when triton.language is first imported.
    """
    pytest.importorskip("triton")
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("ok") == 3
