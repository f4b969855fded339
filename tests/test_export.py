"""Hugging Face export (lrkv.export.export_run): every kind loads in transformers, equals ours, decodes with its cache.

Tiny random models of every kind (tests/helpers.py shapes, the 512-id BPE of tests/evaluate_fixtures.py), exported
once per module; transformers loads each folder offline (`local_files_only`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from evaluate_fixtures import tokenizer
from helpers import randomize, tiny_config

from lrkv import ConfigError, LrkvError, ModelConfig, Transformer
from lrkv.export import export_run
from lrkv.io import load_pretrained
from lrkv.rope import apply_rope, rope_cos_sin
from lrkv.training.checkpoint import save_pretrained

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # transformers round trips of every kind

VOCAB = 512
# name -> (kind, overrides): together they cover QK-norm, ReLU², GELU, SiLU, soft-cap on/off, embedding norm on/off,
# weightless and affine norms, tied embeddings, MLA with and without a query latent, per-layer compressed ranks
CASES = {
    "mha": ("mha", {}),
    "gqa": ("gqa", {"mlp_act": "gelu", "norm_affine": True}),
    "mqa": ("mqa", {"embed_norm": False, "logit_softcap": None}),
    "mla": ("mla", {}),
    "mla_qlatent": ("mla", {"q_latent": 8, "norm_affine": True, "tie_embeddings": True}),
    "lrkv": ("lrkv", {}),
    "lrkv_affine": ("lrkv", {"norm_affine": True, "mlp_act": "silu", "rank": 3}),
    "compressed_kv": ("compressed_kv", {"kv_heads": 2, "attn_options": {"k_ranks": [5, 11], "v_ranks": [7, 3]}}),
}
CACHE_NAMES = {"mha": {"k", "v"}, "gqa": {"k", "v"}, "mqa": {"k", "v"}, "mla": {"c", "k_r"}}
CACHE_NAMES.update(lrkv={"k_s", "v_s", "r_k", "r_v"}, compressed_kv={"k", "v"})
TEXTS = [
    "The for statement is used to iterate over the elements of a sequence.",
    "  leading spaces,\ttabs\nand newlines  ",
    "unicode: naïve café — 日本語 🙂",
    "a literal <|endoftext|> in text stays text",
    "",
]


def build(name: str, seed: int = 0) -> Transformer:
    kind, overrides = CASES[name]
    if kind == "compressed_kv":
        base = dict(n_layer=2, n_head=4, d_model=48, head_dim=16, max_seq_len=64)
        cfg = ModelConfig(attention=kind, vocab_size=VOCAB, **base, **overrides)
    else:
        cfg = tiny_config(kind, vocab_size=VOCAB, **overrides)
    torch.manual_seed(seed)
    model = randomize(Transformer(cfg), seed).eval()
    g = torch.Generator().manual_seed(seed)
    for block in model.blocks:  # compressed_kv: random orthonormal key bases instead of coordinate axes
        if hasattr(block.attn, "pk"):
            q, _ = torch.linalg.qr(torch.randn(cfg.head_dim, cfg.head_dim, generator=g))
            block.attn.pk.copy_(q[:, : block.attn.pk.shape[1]])
    return model


def load_hf(folder: Path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, local_files_only=True, **kwargs
    ).eval()


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """{case: (our model, transformers model, export folder)}"""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name in CASES:
        model = build(name)
        save_pretrained(model, root / name / "pretrained", tok)
        folder = export_run(root / name / "pretrained", root / name / "hf")
        out[name] = (model, load_hf(folder), folder)
    return out


def tokens(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


# ---- every kind: logits, generation, cache ---------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_logits_equal_ours(exported, name):
    ours, hf, folder = exported[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lrkv.LrkvForCausalLM"
    assert type(hf).__name__ == "LrkvForCausalLM"
    assert "import lrkv" not in (folder / "modeling_lrkv.py").read_text()
    x = tokens(24)
    with torch.no_grad():
        expected = ours(x)
        assert (hf(x).logits - expected).abs().max() < 1e-4
        assert (hf(x, use_cache=False).logits - expected).abs().max() < 1e-4
        loss = ours.loss(x[:, :-1], x[:, 1:])
        assert hf(x, labels=x).loss == pytest.approx(loss.item(), abs=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_greedy_generate_equals_ours(exported, tok, name):
    ours, hf, _ = exported[name]
    prompt = tokens(6, batch=2, seed=2)
    expected = ours.generate(prompt, 14, stop_token=tok.eos_id)
    got = hf.generate(prompt, max_new_tokens=14, do_sample=False)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("name", CASES)
def test_cache_holds_what_ours_holds_and_decodes_exactly(exported, name):
    """Prefill 9 tokens, decode 3 one by one: the HF cache's tensors equal ours, bytes per token equal ours,
    it grows with the sequence, and the decoded logits equal the full forward."""
    ours, hf, _ = exported[name]
    x = tokens(12)
    cache = ours.new_cache(2, 12, dtype=torch.float32)
    with torch.no_grad():
        full = ours(x)
        ours(x[:, :9], cache)
        out = hf(x[:, :9], use_cache=True)
        hf_cache = out.cache if hasattr(out, "cache") else out.past_key_values
        assert type(hf_cache).__name__ == "LrkvCache"
        assert (
            hf_cache.nbytes_per_token() == cache.nbytes_per_token() == ours.cfg.kv_cache_bytes_per_token(torch.float32)
        )
        kind = ours.cfg.attention
        for mine, theirs in zip(cache.layers, hf_cache.layers):
            assert set(theirs.tensors) == CACHE_NAMES[kind]
            stored = dict(theirs.tensors)
            if kind == "mla":  # ours keeps [c ; k_r] in one buffer (one read per decode step)
                stored = {"ckr": torch.cat([stored.pop("c"), stored.pop("k_r")], dim=-1)}
            assert set(stored) == set(mine.buffers)
            for key, value in stored.items():
                assert torch.allclose(value, mine.buffers[key][:, :9], atol=1e-5), key
        logits = [out.logits]
        for i in range(9, 12):
            logits.append(hf(x[:, i : i + 1], cache=hf_cache, use_cache=True).logits)
            assert hf_cache.get_seq_length() == i + 1
    assert (torch.cat(logits, dim=1) - full).abs().max() < 1e-4
    assert hf_cache.nbytes() == 2 * 12 * cache.nbytes_per_token()


@pytest.mark.parametrize("name", ["lrkv", "mla", "compressed_kv", "gqa"])
def test_sampling_with_cache_equals_sampling_without(exported, name):
    """Sampling (temperature, top-k, top-p) through the cache draws what sampling without a cache draws."""
    _, hf, _ = exported[name]
    prompt = tokens(5, batch=2, seed=3)
    runs_ = []
    for use_cache in (True, True, False):
        torch.manual_seed(7)
        kwargs = dict(do_sample=True, temperature=1.3, top_k=50, top_p=0.95, max_new_tokens=12, use_cache=use_cache)
        runs_.append(hf.generate(prompt, **kwargs))
    assert runs_[0].tolist() == runs_[1].tolist() == runs_[2].tolist()
    assert runs_[0].shape == (2, 17) and int(runs_[0].max()) < VOCAB


@pytest.mark.parametrize("name", ["lrkv", "mla", "compressed_kv", "mqa"])
def test_left_padded_batch_generates_each_prompt_as_alone(exported, tok, name):
    ours, hf, _ = exported[name]
    long, short = tokens(9, batch=1, seed=4)[0], tokens(5, batch=1, seed=5)[0]
    pad = tok.eos_id
    batch = torch.stack([long, torch.cat([torch.full((4,), pad), short])])
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    got = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad)
    assert got[0, 9:].tolist() == ours.generate(long, 8, stop_token=pad)[9:].tolist()
    alone = ours.generate(short, 8, stop_token=pad)[5:].tolist()
    assert got[1, 9 : 9 + len(alone)].tolist() == alone


def test_remote_code_folder_loads_back_in_lrkv(exported):
    for name in ("lrkv", "compressed_kv"):
        ours, _, folder = exported[name]
        back = load_pretrained(folder).model
        assert back.cfg == ours.cfg
        for key, value in ours.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key


# ---- decoupled LRKV (residual_rope=false) ---------------------------------------------------------------------------
@torch.no_grad()
def decoupled_reference(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """Full forward of the decoupled model from our LRKV weights, score by score:
    s_h(i,j) = (RoPE_i(q_h)·RoPE_j(k_s) + q_h·(R_K,h,j B_K,h)) / sqrt(d_h), q_h = norm(x W_Q,h), k_s = norm(x W_K,s)."""
    cfg = model.cfg
    h = model.embed_norm(model.embed(x))
    b, t, _ = h.shape
    cos, sin = rope_cos_sin(torch.arange(t), cfg.head_dim, cfg.rope_theta)
    for block in model.blocks:
        a, z = block.attn, block.attn_norm(h)
        q = a.q_norm(a.wq(z).view(b, t, cfg.n_head, cfg.head_dim))
        k_s = a.k_norm(a.wk_shared(z)[:, :, None, :])
        r_k = a.uk(z).view(b, t, cfg.n_head, cfg.rank)
        v = a.wv_shared(z)[:, :, None, :] + torch.einsum("bthr,hrd->bthd", a.uv(z).view(b, t, cfg.n_head, -1), a.bv)
        shared = torch.einsum("bihd,bjxd->bhij", apply_rope(q, cos, sin), apply_rope(k_s, cos, sin))
        residual = torch.einsum("bihd,bjhd->bhij", q, torch.einsum("bjhr,hrd->bjhd", r_k, a.bk))
        s = (shared + residual) / math.sqrt(cfg.head_dim)
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        y = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
        h = h + a.wo(y.reshape(b, t, -1))
        h = h + block.mlp(block.mlp_norm(h))
    return model.logits(model.norm(h))


def test_decoupled_lrkv_remote_code(exported):
    """residual_rope=false in the remote code: full forward equals the score-by-score formula, cached decode equals
    the full forward, same cache bytes as exact LRKV, and greedy generation through the cache equals without."""
    ours, _, folder = exported["lrkv"]
    hf = load_hf(folder, residual_rope=False)
    assert hf.config.residual_rope is False
    x = tokens(12)
    with torch.no_grad():
        full = hf(x, use_cache=False).logits
        assert (full - decoupled_reference(ours, x)).abs().max() < 1e-4
        assert (full - ours(x)).abs().max() > 1e-2  # a different model than exact LRKV
        out = hf(x[:, :8], use_cache=True)
        cache, logits = out.cache if hasattr(out, "cache") else out.past_key_values, [out.logits]
        for i in range(8, 12):
            logits.append(hf(x[:, i : i + 1], cache=cache).logits)
    assert (torch.cat(logits, dim=1) - full).abs().max() < 1e-4
    assert cache.nbytes_per_token() == ours.cfg.kv_cache_bytes_per_token(torch.float32)
    prompt = tokens(5, batch=2, seed=6)
    with_cache = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    assert with_cache.tolist() == hf.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False).tolist()


@pytest.mark.skipif("residual_rope" not in ModelConfig.__dataclass_fields__, reason="ModelConfig has no residual_rope")
def test_decoupled_lrkv_export_equals_ours(tmp_path, tok):
    model = randomize(Transformer(tiny_config("lrkv", vocab_size=VOCAB, residual_rope=False)), 0).eval()
    save_pretrained(model, tmp_path / "pretrained", tok)
    folder = export_run(tmp_path / "pretrained", tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["residual_rope"] is False
    x = tokens(16)
    with torch.no_grad():
        assert (load_hf(folder)(x).logits - model(x)).abs().max() < 1e-4


# ---- tokenizer ----------------------------------------------------------------------------------------------------
def test_tokenizer_encodes_and_decodes_identically(exported, tok):
    folder = exported["lrkv"][2]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=True)
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tok.eos_id
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids == hf_tok.encode(text, add_special_tokens=False), text
        assert hf_tok.decode(ids) == tok.decode(ids) == text
    assert hf_tok.decode([tok.eos_id]) == "<|endoftext|>"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == tok.eos_id


# ---- Llama-compatible models --------------------------------------------------------------------------------------
LLAMA = dict(mlp_act="swiglu", qk_norm=False, logit_softcap=None, norm_affine=True, embed_norm=False)


@pytest.mark.parametrize("kind,extra", [("mha", {}), ("gqa", {"tie_embeddings": True}), ("mqa", {"rope_theta": 500.0})])
def test_llama_compatible_models_export_as_plain_llama_and_round_trip(tmp_path, tok, kind, extra):
    model = randomize(Transformer(tiny_config(kind, vocab_size=VOCAB, **LLAMA, **extra)), 3).eval()
    save_pretrained(model, tmp_path / "pretrained", tok)
    folder = export_run(tmp_path / "pretrained", tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert not list(folder.glob("*.py")) and not (folder / "model_config.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert type(hf) is transformers.LlamaForCausalLM
    x = tokens(20)
    prompt = tokens(6, batch=2, seed=2)
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() < 1e-4
    assert hf.generate(prompt, max_new_tokens=10, do_sample=False).tolist() == model.generate(prompt, 10).tolist()
    back = load_pretrained(folder).model  # lrkv's Llama import
    assert back.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    again = export_run(folder, tmp_path / "again")  # the Llama folder is itself a checkpoint: exports unchanged
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name


def test_model_with_lrkv_choices_is_not_exported_as_llama(exported):
    config = json.loads((exported["mha"][2] / "config.json").read_text())  # qk_norm, relu2, softcap: not Llama
    assert config["architectures"] == ["LrkvForCausalLM"]


# ---- trained runs, model card, sharded checkpoints, lm-eval ---------------------------------------------------------
def test_model_card_has_kind_shapes_kv_bytes_and_training_facts(runs, tmp_path):  # noqa: F811
    folder = export_run(runs["lrkv"], tmp_path / "hf")
    card = (folder / "README.md").read_text()
    summary = json.loads((runs["lrkv"] / "summary.json").read_text())
    cfg = load_pretrained(runs["lrkv"]).model.cfg
    assert "# lrkv_test (lrkv)" in card and "trust_remote_code=True" in card
    assert f"{cfg.n_layer} × {cfg.d_model}" in card and f"{cfg.n_head} × {cfg.head_dim}" in card
    assert f"{cfg.kv_cache_bytes_per_token(torch.bfloat16):,} (bf16)" in card
    assert f"| training tokens | {summary['tokens']:,} |" in card
    assert f"{summary['final_val_loss']:.4f}" in card and f"{summary['final_train_loss']:.4f}" in card


def write_sharded_checkpoint(model: Transformer, folder: Path) -> Path:
    """A sharded checkpoint folder as Lightning's FSDP strategy writes it: meta.pt (hyperparameters) + a
    torch.distributed.checkpoint of the state dict under "model." names."""
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True)
    torch.save({"hyper_parameters": {"model": model.cfg.to_dict()}}, folder / "meta.pt")
    state = {"state_dict": {"model." + k: v.clone() for k, v in model.state_dict().items()}}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_sharded_checkpoint_exports_from_one_process(tmp_path, tok):
    model = build("lrkv", seed=4)
    run = tmp_path / "run"
    ckpt = write_sharded_checkpoint(model, run / "checkpoints" / "step-00000002.ckpt")
    (run / "checkpoints" / "last.ckpt").symlink_to(ckpt.name)
    tok.save(str(run / "tokenizer.json"))
    (run / "metrics.csv").write_text("step,tokens,train_loss\n2,256,5.5\n")
    folder = export_run(run, tmp_path / "hf")
    x = tokens(16)
    with torch.no_grad():
        assert (load_hf(folder)(x).logits - model(x)).abs().max() < 1e-4
    assert "| training tokens | 256 |" in (folder / "README.md").read_text()
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.slow
def test_fsdp_training_checkpoint_exports(tmp_path):
    """A real 2-process FSDP run (trainer=cpu_fsdp) exports from its sharded checkpoint in this one process."""
    from train_helpers import run_script, tiny_overrides

    args = tiny_overrides(tmp_path, tmp_path / "cache", model="lrkv_tiny", steps=2, run_name="fsdp")
    args += ["trainer=cpu_fsdp", "data.batch_size=2", "train.ckpt_every=2"]
    result = run_script(args, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "runs" / "fsdp" / "checkpoints" / "step-00000002.ckpt"
    assert ckpt.is_dir()
    folder = export_run(ckpt, tmp_path / "hf")
    ours = load_pretrained(ckpt).model
    x = torch.randint(0, ours.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert (load_hf(folder)(x).logits - ours(x)).abs().max() < 1e-4


@pytest.mark.slow
def test_lm_eval_hf_model_on_export_scores_as_our_adapter(runs, tmp_path):  # noqa: F811
    """lm-eval's `hf` model on the export == our `lrkv` adapter (prefix_eos=false: hf puts nothing before a context)."""
    pytest.importorskip("accelerate")  # lm-eval's hf model imports it
    import lm_eval
    import lm_eval.models.huggingface  # noqa: F401 - registers "hf"
    from lm_eval.tasks import TaskManager

    import lrkv.evaluation  # noqa: F401 - registers "lrkv"

    data = Path(__file__).resolve().parent / "data" / "lm_eval"
    for yaml_file in data.glob("*.yaml"):
        (tmp_path / yaml_file.name).write_text(yaml_file.read_text().replace("DATA_DIR", str(data)))
    tasks = ["lrkv_tiny_mc", "lrkv_tiny_cloze", "lrkv_tiny_rolling", "lrkv_tiny_gen"]
    folder = export_run(runs["lrkv"], tmp_path / "hf")
    results, generated = {}, {}
    for model, args in (
        ("lrkv", f"checkpoint={runs['lrkv']},batch_size=2,prefix_eos=false"),
        ("hf", f"pretrained={folder},trust_remote_code=True,dtype=float32,device=cpu,batch_size=2"),
    ):
        out = lm_eval.simple_evaluate(
            model=model,
            model_args=args,
            tasks=tasks,
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            bootstrap_iters=0,
            log_samples=True,
        )
        results[model] = out["results"]
        samples = sorted(out["samples"]["lrkv_tiny_gen"], key=lambda s: s["doc_id"])
        generated[model] = [s["filtered_resps"] for s in samples]
    for task in tasks:
        assert any(isinstance(v, float) for v in results["lrkv"][task].values()), task
        for metric, value in results["lrkv"][task].items():
            if isinstance(value, float):
                assert results["hf"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)
    assert generated["hf"] == generated["lrkv"]  # batches of 2 prompts of different lengths: left padding in hf
    assert any(text.strip() for texts in generated["lrkv"] for text in texts)


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_non_empty_output_folder_needs_overwrite(tmp_path, tok):
    save_pretrained(build("mqa"), tmp_path / "pretrained", tok)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ConfigError) as e:
        export_run(tmp_path / "pretrained", out)
    message = str(e.value)
    assert "\n" not in message and "exists and is not empty" in message and "overwrite=true" in message
    assert (out / "old.txt").is_file()
    export_run(tmp_path / "pretrained", out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp")]
    with pytest.raises(ConfigError, match="holds the checkpoint"):
        export_run(tmp_path / "pretrained", tmp_path, overwrite=True)
    assert (tmp_path / "pretrained" / "model.safetensors").is_file()


def test_checkpoint_without_tokenizer_exports_the_model_and_says_so(tmp_path, capsys):
    model = build("mla")
    save_pretrained(model, tmp_path / "pretrained")
    folder = export_run(tmp_path / "pretrained", tmp_path / "hf")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer" in err[0] and "without tokenizer files" in err[0]
    assert not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists()
    assert "No tokenizer was written" in (folder / "README.md").read_text()
    x = tokens(8)
    with torch.no_grad():
        assert (load_hf(folder)(x).logits - model(x)).abs().max() < 1e-4


def test_bad_checkpoint_is_one_line(tmp_path):
    with pytest.raises(LrkvError) as e:
        export_run(tmp_path / "nothing", tmp_path / "hf")
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_lrkv_dependency_free_remote_code(exported):
    """The shipped remote code imports neither lrkv nor anything but torch and transformers."""
    folder = exported["mla"][2]
    for name in ("configuration_lrkv.py", "modeling_lrkv.py"):
        imports = [line for line in (folder / name).read_text().splitlines() if line.startswith(("import", "from"))]
        roots = {line.split()[1].split(".")[0] for line in imports}
        assert roots <= {"__future__", "math", "torch", "transformers", ""}, roots  # "": .configuration_lrkv
