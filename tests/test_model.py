"""The core model: every attention kind, its KV cache, equivalences between kinds, footprint, errors."""

import math

import pytest
import torch
from helpers import KINDS, decode_in_chunks, random_model, randomize, tiny_config

from lrkv import ConfigError, ModelConfig, Transformer, list_presets, load_model_config, param_counts
from lrkv.attention import get_attention_class, register
from lrkv.attention.gqa import GroupedQueryAttention
from lrkv.attention.lrkv import LowRankKVAttention

ATOL = 1e-4  # fp32; logits are O(1)


def tokens(b=2, t=20, seed=1, vocab=97):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def set_lrkv_chunk(model, chunk):
    for block in model.blocks:
        if isinstance(block.attn, LowRankKVAttention):
            block.attn.decode_chunk = chunk


# ---- cached decoding == full forward ------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_token_by_token_matches_full_forward(kind):
    model, x = random_model(kind), tokens()
    with torch.no_grad():
        full = model(x)
        cached = decode_in_chunks(model, x, [7] + [1] * 13)
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_matches_full_forward(kind):
    model, x = random_model(kind, seed=3), tokens(seed=4)
    set_lrkv_chunk(model, 3)  # several rebuild chunks per step, with partial last chunks
    with torch.no_grad():
        full = model(x)
        cached = decode_in_chunks(model, x, [5, 3, 1, 6, 5])
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)


def test_lrkv_decode_is_exact_in_float64():
    model, x = random_model("lrkv", seed=5).double(), tokens(seed=6)
    set_lrkv_chunk(model, 4)
    with torch.no_grad():
        full = model(x)
        cached = decode_in_chunks(model, x, [6] + [1] * 14, cache_dtype=torch.float64)
    assert (cached - full).abs().max() < 1e-10


def test_lrkv_cache_holds_no_per_head_keys():
    model = random_model("lrkv")
    cache = model.new_cache(2, 16, dtype=torch.float32)
    shapes = {name: tuple(t.shape) for name, t in cache.layers[0].buffers.items()}
    h, dh, r = model.cfg.n_head, model.cfg.head_dim, model.cfg.rank
    assert shapes == {"k_s": (2, 16, dh), "v_s": (2, 16, dh), "r_k": (2, 16, h, r), "r_v": (2, 16, h, r)}


def test_bf16_cache_decode_is_close():
    model, x = random_model("lrkv"), tokens()
    with torch.no_grad():
        full = model(x)
        cached = decode_in_chunks(model, x, [7] + [1] * 13, cache_dtype=torch.bfloat16)
    err = (cached - full).abs().max().item()
    assert 0 < err < 0.1  # bf16 storage rounds, but stays close


# ---- equivalences between kinds -----------------------------------------------------------------
def test_gqa_with_h_groups_equals_mha():
    mha = random_model("mha")
    gqa = Transformer(tiny_config("gqa", kv_heads=mha.cfg.n_head))
    gqa.load_state_dict(mha.state_dict())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-6, rtol=0)


def test_mqa_equals_gqa_with_one_group():
    mqa = random_model("mqa")
    gqa = Transformer(tiny_config("gqa", kv_heads=1))
    gqa.load_state_dict(mqa.state_dict())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mqa(x), atol=1e-6, rtol=0)


def lrkv_as_mqa(lrkv_model):
    """An MQA model whose single K/V head is LRKV's shared projection, other weights copied."""
    mqa = Transformer(tiny_config("mqa"))
    state = {}
    for name, value in lrkv_model.state_dict().items():
        name = name.replace("wk_shared", "wk").replace("wv_shared", "wv")
        if name.split(".")[-2] not in ("uk", "uv") and not name.endswith((".bk", ".bv")):
            state[name] = value
    mqa.load_state_dict(state)
    return mqa.eval()


@pytest.mark.parametrize("rank", [0, 5])
def test_lrkv_with_zero_residual_equals_mqa(rank):
    lrkv = random_model("lrkv", rank=rank)
    with torch.no_grad():
        for block in lrkv.blocks:
            block.attn.bk.zero_()
            block.attn.bv.zero_()
    mqa, x = lrkv_as_mqa(lrkv), tokens()
    with torch.no_grad():
        torch.testing.assert_close(lrkv(x), mqa(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(decode_in_chunks(lrkv, x, [4] + [1] * 16), mqa(x), atol=ATOL, rtol=0)
    # and the residual matters: with random B the models differ
    randomize(lrkv, seed=9)
    with torch.no_grad():
        assert (lrkv(x) - lrkv_as_mqa(lrkv)(x)).abs().max() > 1e-2 or rank == 0


def test_lrkv_folded_equals_factored():
    factored = random_model("lrkv")
    folded = Transformer(tiny_config("lrkv", lrkv_impl="folded"))
    folded.load_state_dict(factored.state_dict())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), factored(x), atol=1e-5, rtol=0)


def set_absorb(model, mode):
    for block in model.blocks:
        block.attn.absorb = mode


@pytest.mark.parametrize("q_latent", [0, 10])
def test_mla_absorbed_equals_naive(q_latent):
    model, x = random_model("mla", q_latent=q_latent), tokens()
    with torch.no_grad():
        set_absorb(model, False)
        naive_full = model(x)
        naive_decode = decode_in_chunks(model, x, [6] + [1] * 14)
        set_absorb(model, True)
        absorbed_full = model(x)
        absorbed_decode = decode_in_chunks(model, x, [6] + [1] * 14)
    torch.testing.assert_close(absorbed_full, naive_full, atol=ATOL, rtol=0)
    torch.testing.assert_close(absorbed_decode, naive_decode, atol=ATOL, rtol=0)
    torch.testing.assert_close(absorbed_decode, naive_full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_causality(kind):
    model, x = random_model(kind), tokens()
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3  # the future did change


# ---- generation ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_with_cache_equals_without(kind):
    model, prompt = random_model(kind), tokens(t=5)
    with_cache = model.generate(prompt, max_new_tokens=12, cache_dtype=torch.float32)
    without = model.generate(prompt, max_new_tokens=12, use_cache=False)
    assert with_cache.shape == (2, 17)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :5], prompt)


def test_sampling_options():
    model, prompt = random_model("lrkv"), tokens(t=4)
    greedy = model.generate(prompt, 8, cache_dtype=torch.float32)
    top1 = model.generate(prompt, 8, temperature=1.0, top_k=1, cache_dtype=torch.float32)
    nucleus = model.generate(prompt, 8, temperature=1.0, top_p=1e-6, cache_dtype=torch.float32)
    assert torch.equal(top1, greedy) and torch.equal(nucleus, greedy)
    sample = lambda seed: model.generate(  # noqa: E731
        prompt, 8, temperature=1.5, generator=torch.Generator().manual_seed(seed), cache_dtype=torch.float32
    )
    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_top_p_keeps_the_nucleus():
    from lrkv.generate import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_p=0.8, generator=g)) for _ in range(300)}
    assert draws == {0, 1}


def test_stop_token_ends_generation():
    model, prompt = random_model("mha"), tokens(b=1, t=4)
    free = model.generate(prompt, 10, cache_dtype=torch.float32)
    stop = int(free[0, 6])  # the third generated token
    stopped = model.generate(prompt, 10, stop_token=stop, cache_dtype=torch.float32)
    first = (free[0, 4:] == stop).nonzero()[0].item() + 4
    assert stopped.shape[1] == first + 1 and int(stopped[0, -1]) == stop
    assert torch.equal(stopped[0], free[0, : first + 1])


# ---- footprint and parameter counts ------------------------------------------------------------
@pytest.mark.parametrize("name", list_presets())
def test_measured_cache_bytes_equal_analytic_for_every_preset(name):
    cfg = load_model_config(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        cache = model.new_cache(batch_size=2, max_len=8, dtype=dtype, device="meta")
        with torch.no_grad():
            model(torch.zeros(2, 5, dtype=torch.long, device="meta"), cache)  # a real prefill (meta tensors)
        assert cache.length == 5
        assert cache.nbytes_per_token() == cfg.kv_cache_bytes_per_token(dtype)
        assert cache.nbytes() == 2 * 5 * cfg.kv_cache_bytes_per_token(dtype)


def test_footprint_measured_on_a_real_cache():
    for kind in KINDS:
        model = random_model(kind)
        cache = model.new_cache(3, 16, dtype=torch.bfloat16)
        with torch.no_grad():
            model(tokens(b=3, t=9), cache)
        assert cache.nbytes_per_token() == model.cfg.kv_cache_bytes_per_token(torch.bfloat16)


SIZES = {"128m": 128e6, "512m": 512e6, "1b": 1.2e9, "2b5": 2.5e9, "6b3": 6.3e9}


@pytest.mark.parametrize("size", SIZES)
def test_preset_cache_ratios_and_shapes(size):
    mha = load_model_config(f"mha_{size}")
    lrkv = load_model_config(f"lrkv_{size}")
    ratio = lrkv.kv_cache_bytes_per_token() / mha.kv_cache_bytes_per_token()
    assert ratio == pytest.approx(1 / mha.n_head + lrkv.rank / mha.head_dim, abs=1e-12)
    assert load_model_config(f"mqa_{size}").kv_cache_elements_per_token() == 2 * 128 * mha.n_layer
    gqa = load_model_config(f"gqa_{size}")
    assert gqa.kv_cache_elements_per_token() == 2 * gqa.kv_heads * 128 * mha.n_layer
    mla = load_model_config(f"mla_{size}")
    assert mla.kv_cache_elements_per_token() == (mla.kv_latent + 64) * mha.n_layer
    for kind in ("gqa", "mqa", "mla", "lrkv"):  # one shape per size, as in the paper
        cfg = load_model_config(f"{kind}_{size}")
        assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.head_dim) == (mha.n_layer, mha.n_head, mha.d_model, 128)


def test_paper_cache_ratios_match_design_table():
    expected = {"128m": 0.526, "512m": 0.482, "1b": 0.482, "2b5": 0.485, "6b3": 0.453}
    for size, value in expected.items():
        ratio = (
            load_model_config(f"lrkv_{size}").kv_cache_bytes_per_token()
            / load_model_config(f"mha_{size}").kv_cache_bytes_per_token()
        )
        assert ratio == pytest.approx(value, abs=6e-4)


@pytest.mark.parametrize("size", SIZES)
def test_param_counts_match_preset_names(size):
    """Convention: the name is the MHA model's non-embedding parameter count (see configs/model/*.yaml)."""
    counts = param_counts(load_model_config(f"mha_{size}"))
    assert abs(counts["non_embedding"] / SIZES[size] - 1) < 0.10
    for kind in ("gqa", "mqa", "mla", "lrkv"):  # same shape, fewer attention parameters
        other = param_counts(load_model_config(f"{kind}_{size}"))["non_embedding"]
        assert 0.80 * counts["non_embedding"] < other < counts["non_embedding"]


def test_param_count_formula_for_mha():
    cfg = tiny_config("mha")
    d, v, l, hd = cfg.d_model, cfg.vocab_size, cfg.n_layer, cfg.n_head * cfg.head_dim
    per_layer = 4 * d * hd + 2 * d * cfg.mlp_hidden
    counts = param_counts(cfg)
    assert counts == {"total": l * per_layer + 2 * v * d, "non_embedding": l * per_layer + v * d}
    assert Transformer(cfg).num_params() == counts["total"]


def test_flops_per_token_formula():
    cfg = load_model_config("mha_128m")
    with torch.device("meta"):
        model = Transformer(cfg)
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token(2048) == 6 * n + 12 * 12 * 6 * 128 * 2048


def test_lrkv_init_residual_ratio():
    model = Transformer(
        ModelConfig(attention="lrkv", n_layer=1, n_head=4, d_model=256, head_dim=64, rank=16, vocab_size=64)
    )
    attn = model.blocks[0].attn
    u = attn.uk.weight.view(4, 16, 256)
    with torch.no_grad():
        ratios = [(u[h].T @ attn.bk[h]).norm() / attn.wk_shared.weight.norm() for h in range(4)]
    assert all(0.07 < r.item() < 0.13 for r in ratios)


# ---- presets and the registry ----------------------------------------------------------------
def test_presets_cover_every_kind_and_size():
    names = set(list_presets())
    for kind in KINDS:
        for size in list(SIZES) + ["tiny"]:
            assert f"{kind}_{size}" in names


def test_load_model_config_with_overrides():
    cfg = load_model_config("lrkv_1b", rank=32)
    assert (cfg.name, cfg.attention, cfg.rank, cfg.n_layer) == ("lrkv_1b", "lrkv", 32, 40)
    assert cfg.residual_init == 0.1 and cfg.qk_norm and cfg.logit_softcap == 15.0
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_a_new_kind_is_one_registered_class():
    @register("mha_test_copy")
    class CopyOfMHA(GroupedQueryAttention):
        fields = ()

        @classmethod
        def validate(cls, cfg):
            cfg.attn_options.setdefault("groups", cfg.n_head)
            cfg.kv_heads = None  # owns no ModelConfig field; reads attn_options

        def __init__(self, cfg, layer=0):
            cfg_copy = ModelConfig.__new__(ModelConfig)
            cfg_copy.__dict__.update({**cfg.__dict__, "kv_heads": cfg.attn_options["groups"]})
            super().__init__(cfg_copy, layer)

        @classmethod
        def cache_elements_per_token(cls, cfg):
            return 2 * cfg.attn_options["groups"] * cfg.head_dim

    assert get_attention_class("mha_test_copy") is CopyOfMHA
    cfg = tiny_config("mha").replace(attention="mha_test_copy", kv_heads=None)
    model, x = Transformer(cfg), tokens()
    randomize(model)
    with torch.no_grad():
        torch.testing.assert_close(decode_in_chunks(model, x, [10] + [1] * 10), model(x), atol=ATOL, rtol=0)
    assert cfg.kv_cache_bytes_per_token(torch.float32) == tiny_config("mha").kv_cache_bytes_per_token(torch.float32)


# ---- errors --------------------------------------------------------------------------------------
BAD_CONFIGS = [
    (dict(attention="gqa", kv_heads=3), "kv_heads"),  # 4 heads not divisible by 3
    (dict(attention="gqa"), "kv_heads"),
    (dict(attention="mha", kv_heads=2), "kv_heads"),
    (dict(attention="mqa", kv_heads=2), "kv_heads"),
    (dict(attention="lrkv", rank=17), "rank"),  # > head_dim 16
    (dict(attention="lrkv", rank=-1), "rank"),
    (dict(attention="lrkv"), "rank"),
    (dict(attention="mla", kv_latent=0), "kv_latent"),
    (dict(attention="mla"), "kv_latent"),
    (dict(attention="mla", kv_latent=8, rope_dim=7), "rope_dim"),
    (dict(attention="mha", rank=8), "rank"),  # a field the kind does not use
    (dict(attention="lrkv", rank=4, lrkv_impl="fast"), "lrkv_impl"),
    (dict(attention="flash"), "attention"),
    (dict(attention="mha", head_dim=15), "head_dim"),
    (dict(attention="mha", n_layer=0), "n_layer"),
    (dict(attention="mha", mlp_act="tanh"), "mlp_act"),
]


@pytest.mark.parametrize("fields,name", BAD_CONFIGS)
def test_bad_config_gives_one_line_error_naming_the_field(fields, name):
    base = dict(n_layer=2, n_head=4, d_model=48, head_dim=16, vocab_size=97)
    with pytest.raises(ConfigError) as err:
        ModelConfig(**{**base, **fields})
    message = str(err.value)
    assert "\n" not in message and name in message


def test_unknown_preset_and_field_errors():
    with pytest.raises(ConfigError, match="unknown model preset 'lrkv_9b'.*lrkv_1b"):
        load_model_config("lrkv_9b")
    with pytest.raises(ConfigError, match="unknown model field 'rnak'"):
        load_model_config("lrkv_1b", rnak=3)


def test_cache_overflow_and_context_errors():
    model = random_model("mha")
    cache = model.new_cache(1, 8, dtype=torch.float32)
    with pytest.raises(ConfigError, match="KV cache is full"):
        model(tokens(b=1, t=9), cache)
    with pytest.raises(ConfigError, match="max_seq_len"):
        model(tokens(b=1, t=65))


def test_rotate_with_and_without_autograd_equals_apply_rope():
    from lrkv.rope import apply_rope, rope_cos_sin, rotate

    x = torch.randn(2, 5, 3, 8)
    cos, sin = rope_cos_sin(torch.arange(5), 8)
    ref = apply_rope(x, cos, sin)
    with torch.no_grad():
        fast = rotate(x, cos[:, None], sin[:, None])  # the decode path: halves written in place
    x.requires_grad_(True)
    slow = rotate(x, cos[:, None], sin[:, None])
    slow.sum().backward()  # the autograd path
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(slow.detach(), ref, atol=1e-6, rtol=0)
    assert x.grad is not None


def test_rope_rotation_preserves_norm_and_is_relative():
    from lrkv.rope import apply_rope, rope_cos_sin

    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(i, j):
        ci, si = rope_cos_sin(torch.tensor([i]), 16)
        cj, sj = rope_cos_sin(torch.tensor([j]), 16)
        return float((apply_rope(q, ci.double(), si.double()) * apply_rope(k, cj.double(), sj.double())).sum())

    assert math.isclose(score(3, 1), score(10, 8), rel_tol=1e-6)  # depends on i - j only
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-3)


def reference_flash_attn(q, k, v, softmax_scale=None, causal=False):
    """flash_attn_func's documented semantics on CPU: (B, T, H, D) layout, GQA by head groups, causal
    mask aligned bottom-right when the query is shorter than the keys."""
    b, tq, h, d = q.shape
    tk, g = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(h // g, dim=2), v.repeat_interleave(h // g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (softmax_scale or d**-0.5)
    if causal:
        s = s.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@pytest.mark.parametrize("kind", ["mha", "gqa", "lrkv"])
def test_flash_attention_path_calls_flash_correctly(kind, monkeypatch):
    """The flash-attn branch (GPU only) is exercised on CPU with a reference function of the same contract."""
    from lrkv.attention import kernel

    model, x = random_model(kind), tokens()
    with torch.no_grad():
        sdpa_full, sdpa_decode = model(x), decode_in_chunks(model, x, [7, 3] + [1] * 10)
    calls = []

    def fake(q, k, v, softmax_scale=None, causal=False):
        calls.append((q.shape, k.shape))
        return reference_flash_attn(q, k, v, softmax_scale, causal)

    monkeypatch.setattr(kernel, "flash_attn_func", fake)
    monkeypatch.setattr(kernel, "flash_usable", lambda q, v: True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), sdpa_full, atol=ATOL, rtol=0)
        torch.testing.assert_close(decode_in_chunks(model, x, [7, 3] + [1] * 10), sdpa_decode, atol=ATOL, rtol=0)
    assert calls and all(len(shape) == 4 for shape, _ in calls)
