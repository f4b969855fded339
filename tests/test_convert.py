"""MHA/GQA -> LRKV conversion (lrkv/convert.py) and train.init_from."""

import json
import math

import pytest
import torch
from helpers import decode_in_chunks, random_model

from lrkv.convert import FITS, convert_model, fit_als, fit_mean_svd, head_projections, relative_error
from lrkv.errors import ConfigError, LrkvError
from lrkv.evaluation.conversion import convert_run
from lrkv.io import load_pretrained
from lrkv.training.checkpoint import save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")
SOURCES = {"mha": {}, "gqa": {"kv_heads": 2}, "mqa": {}, "lrkv": {"rank": 5}}


def tokens(b=2, t=24, seed=1, vocab=97):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("kind", list(SOURCES))
def test_full_rank_conversion_reproduces_the_source_logits(kind, fit):
    source = random_model(kind, **SOURCES[kind])
    x = tokens()
    converted, report = convert_model(source, rank=source.cfg.head_dim, fit=fit)
    assert converted.cfg.attention == "lrkv" and converted.cfg.rank == 16
    assert report["k_error"] < 1e-6 and report["v_error"] < 1e-6
    with torch.no_grad():
        ref = source(x)
        assert ref.std() > 0.5
        torch.testing.assert_close(converted(x), ref, atol=1e-4, rtol=0)
    # the converted model decodes through its own (shared + latent) cache to the same logits
    torch.testing.assert_close(decode_in_chunks(converted, x, [8] + [1] * 16), ref, atol=1e-4, rtol=0)


def test_everything_but_the_kv_projections_is_copied():
    source = random_model("gqa", kv_heads=2)
    converted, _ = convert_model(source, rank=4)
    ours, theirs = converted.state_dict(), source.state_dict()
    same = [k for k in theirs if ".wk." not in k and ".wv." not in k]
    assert same and all(torch.equal(ours[k], theirs[k]) for k in same)
    fields = {k: v for k, v in source.cfg.to_dict().items() if k not in ("name", "attention", "kv_heads", "rank")}
    assert {k: converted.cfg.to_dict()[k] for k in fields} == {
        **fields,
        "residual_init": 0.1,
        "lrkv_impl": "factored",
        "residual_rope": True,
    }
    assert converted.cfg.kv_cache_elements_per_token() == 2 * (2 * 16 + 2 * 4 * 4)


def test_gqa_heads_take_their_groups_projection():
    source = random_model("gqa", kv_heads=2)
    attn = source.blocks[0].attn
    w = head_projections(attn, "k")
    groups = attn.wk.weight.view(2, 16, -1)
    assert torch.equal(w[0], groups[0]) and torch.equal(w[1], groups[0]) and torch.equal(w[3], groups[1])


def test_mean_svd_error_is_the_truncated_singular_values():
    torch.manual_seed(0)
    w = torch.randn(4, 16, 48, dtype=torch.float64)
    for rank in (0, 3, 8):
        factors = fit_mean_svd(w, rank)
        tail = torch.linalg.svdvals(w - w.mean(0))[:, rank:]
        assert relative_error(w, factors) == pytest.approx(float(tail.square().sum().sqrt() / w.norm()), rel=1e-9)
        # U and B carry the same scale (singular values split evenly)
        if rank:
            torch.testing.assert_close(factors.b.norm(dim=2), factors.u.norm(dim=2))


def test_als_never_loses_to_mean_svd_and_errors_fall_with_rank():
    source = random_model("mha")
    w = head_projections(source.blocks[1].attn, "v").double()
    previous = math.inf
    for rank in range(0, 17, 4):
        mean_svd, als = relative_error(w, fit_mean_svd(w, rank)), relative_error(w, fit_als(w, rank))
        assert als <= mean_svd + 1e-12 and als <= previous + 1e-12
        previous = als
    assert relative_error(w, fit_als(w, 4)) < 0.95 * relative_error(w, fit_mean_svd(w, 4))  # ALS does improve
    assert previous < 1e-9  # rank = head_dim is exact


def test_bad_ranks_fits_sources_and_outputs_are_one_line_errors(tmp_path):
    source = random_model("mha")
    for rank, words in ((17, "head_dim=16"), (-1, "outside"), (2.5, "outside"), (True, "outside")):
        with pytest.raises(ConfigError, match=words):
            convert_model(source, rank=rank)
    with pytest.raises(ConfigError, match="fit='svd' is unknown"):
        convert_model(source, rank=4, fit="svd")
    with pytest.raises(ConfigError, match="cannot convert attention='mla'"):
        convert_model(random_model("mla"), rank=4)
    folder = save_pretrained(source, tmp_path / "src")
    for kwargs, words in (
        ({"to": "mla", "rank": 4}, "to='mla' is not supported"),
        ({"rank": None}, "needs rank=R"),
        ({"rank": 99}, "outside"),
    ):
        with pytest.raises(ConfigError, match=words) as err:
            convert_run(folder, tmp_path / "out", **kwargs)
        assert "\n" not in str(err.value)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="overwrite=true"):
        convert_run(folder, tmp_path / "full", rank=4)
    with pytest.raises(LrkvError, match="does not exist"):
        convert_run(tmp_path / "missing", tmp_path / "out2", rank=4)


def test_convert_run_writes_a_pretrained_folder_and_scores_both_models(runs, tmp_path):  # noqa: F811
    source = runs["mha"]
    full = convert_run(source, tmp_path / "full", rank=16, loss={"max_batches": 2})
    assert full["source_loss"]["loss"] < 5.5  # a trained model (ln 512 = 6.24)
    assert full["converted_loss"]["loss"] == pytest.approx(full["source_loss"]["loss"], abs=1e-4)
    low = convert_run(source, tmp_path / "low", rank=2, fit="mean_svd", loss={"max_batches": 2})
    assert low["converted_loss"]["loss"] > low["source_loss"]["loss"] + 1e-3
    assert low["kv_bytes_per_token"]["converted"] < low["kv_bytes_per_token"]["source"]
    for name in ("model_config.json", "model.safetensors", "tokenizer.json", "convert.json", "summary.json"):
        assert (tmp_path / "low" / name).is_file()
    loaded = load_pretrained(tmp_path / "low")
    assert (loaded.model.cfg.attention, loaded.model.cfg.rank) == ("lrkv", 2) and loaded.tokenizer is not None
    assert json.loads((tmp_path / "low" / "convert.json").read_text())["fit"] == "mean_svd"
    assert "source" in low["text"] and f"{low['converted_loss']['loss']:.4f}" in low["text"]
    again = convert_run(source, tmp_path / "low", rank=3, overwrite=True, score=False)
    assert again["converted_loss"] is None and "not measured" in again["text"]


def test_a_hugging_face_llama_folder_converts_exactly_at_full_rank(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / math.sqrt(p.shape[1]))
    hf.save_pretrained(tmp_path / "llama")
    result = convert_run(tmp_path / "llama", tmp_path / "out", rank=16)
    assert result["source_attention"] == "gqa" and result["source_loss"] is None  # no tokenizer: not scored
    converted = load_pretrained(tmp_path / "out").model
    assert not converted.cfg.qk_norm and converted.cfg.mlp_act == "swiglu"
    x = tokens(b=2, t=20)
    with torch.no_grad():
        ref = hf(x).logits
        assert ref.std() > 0.5
        torch.testing.assert_close(converted(x), ref, atol=1e-4, rtol=0)


# ---- train.init_from -------------------------------------------------------------------------------------
def init_overrides(tmp_path, source, model="lrkv_tiny", **extra):
    from train_helpers import tiny_overrides

    fields = {"model.rank": 4} if model == "lrkv_tiny" else {}
    fields |= {"model.n_layer": 2, "train.init_from": str(source), "train.val_every": 0, **extra}
    return tiny_overrides(tmp_path / "out", tmp_path / "cache", model=model, steps=2, **fields)


@pytest.mark.slow
def test_init_from_starts_training_at_the_converted_weights(runs, tmp_path):  # noqa: F811
    import lightning as L
    from train_helpers import train_in_process

    folder = tmp_path / "converted"
    convert_run(runs["mha"], folder, rank=4, score=False)
    expected = load_pretrained(folder).model.state_dict()

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            self.fresh = trainer.lr_scheduler_configs[0].scheduler.last_epoch == 0 and not trainer.optimizers[0].state
            self.step = trainer.global_step

    capture = Capture()
    summary = train_in_process(init_overrides(tmp_path, folder), tmp_path / "run", callbacks=[capture])
    assert capture.step == 0 and capture.fresh  # a fresh optimizer and schedule
    assert all(torch.equal(capture.state[k], v) for k, v in expected.items())
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert str(folder / "tokenizer.json") in config  # the source's tokenizer
    assert math.isfinite(summary["final_train_loss"]) and summary["steps"] == 2


def test_init_from_a_model_of_another_shape_is_a_one_line_error(runs, tmp_path):  # noqa: F811
    from train_helpers import train_in_process

    folder = tmp_path / "converted"
    convert_run(runs["mha"], folder, rank=4, score=False)
    with pytest.raises(LrkvError, match=r"has model.rank=4, this run has 8; set model.rank=4") as err:
        train_in_process(init_overrides(tmp_path, folder, **{"model.rank": 8}), tmp_path / "run")
    assert "\n" not in str(err.value)
    with pytest.raises(LrkvError, match="has model.attention='lrkv', this run has 'mha'"):
        train_in_process(init_overrides(tmp_path, folder, model="mha_tiny"), tmp_path / "r2")
