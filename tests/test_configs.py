"""Every training config composes with Hydra and resolves, and presets load the same with and without Hydra."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lrkv import ModelConfig, list_presets, load_model_config
from lrkv.training.plan import batch_plan

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REQUIRED = {  # values a group option leaves to the user (???)
    "data=local": ["data.source=/tmp/corpus.jsonl"],
    "tokenizer=gpt2": ["tokenizer.path=/models/gpt2"],
    "tokenizer=file": ["tokenizer.path=/models/tok/tokenizer.json"],
}


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def resolve(cfg):
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)  # as during a real run, so ${hydra:...} resolves
    plain = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in cfg
        if k != "hydra"
    }  # every interpolation resolves (hydra:, now:, model.*)
    plain["hydra"] = OmegaConf.to_container(cfg.hydra)
    return plain


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "data", "tokenizer", "optim", "trainer", "logger", "callbacks", "paths"])
def test_every_group_option_composes(group):
    for option in options(group):
        choice = f"{group}={option}"
        cfg = resolve(compose_train([choice, *REQUIRED.get(choice, [])]))
        assert cfg["hydra"]["runtime"]["choices"][group] == option
        if group == "model":
            assert ModelConfig.from_dict(cfg["model"]).name == option


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment):
    extra = ["tokenizer.path=/models/gpt2"] if experiment.startswith("paper") else []
    if experiment == "midtrain_tiny":  # data=chat: the conversations are given on the command line
        extra.append("data.source=conversations.jsonl")
    if experiment == "paper":  # the shared recipe of paper_<size>, used with a model chosen on the command line
        extra.append("model=lrkv_1b")
    cfg = resolve(compose_train([f"experiment={experiment}", *extra]))
    model = ModelConfig.from_dict(cfg["model"])
    if experiment.startswith("paper"):
        size = experiment.removeprefix("paper").removeprefix("_") or "1b"
        assert model.name == f"lrkv_{size}" and cfg["data"]["source"] == "hf:HuggingFaceFW/fineweb-edu"
        assert cfg["optim"]["warmup_steps"] == 2000 and cfg["optim"]["weight_decay"] == 0.1
        assert (cfg["optim"]["matrix_lr"], cfg["optim"]["embed_lr"], cfg["optim"]["head_lr"]) == (0.02, 0.2, 0.004)
        assert cfg["train"]["max_tokens"] == (100e9 if size == "128m" else 50e9)
        accumulate, tokens, steps = batch_plan(cfg["train"], cfg["data"]["batch_size"], cfg["data"]["seq_len"], 8)
        assert (accumulate, tokens) == (1, 262144) and steps == -(-int(cfg["train"]["max_tokens"]) // 262144)
    elif experiment == "midtrain_128m":  # the paper's mid-training mix (docs/post-training.md)
        from lrkv.data.mixture import parse_sources

        specs = parse_sources(cfg["data"]["sources"], val_fraction=0.05, split_seed=0)
        assert [(s.format, s.weight) for s in specs] == [("chat", 460), ("mmlu", 100), ("gsm8k", 8)]
        assert model.name == "lrkv_128m" and cfg["optim"]["warmup_steps"] == 0
    elif experiment == "midtrain_tiny":
        assert cfg["data"]["format"] == "chat" and cfg["data"]["source"] == "conversations.jsonl"
    else:
        assert str(cfg["hydra"]["mode"]).endswith("MULTIRUN") and cfg["hydra"]["sweeper"]["params"]


@pytest.mark.parametrize("search", options("hparams_search"))
def test_every_hparams_search_composes(search):
    cfg = compose_train([f"hparams_search={search}"])
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params


@pytest.mark.parametrize("name", list_presets())
def test_hydra_model_equals_load_model_config(name):
    cfg = resolve(compose_train([f"model={name}"]))
    assert ModelConfig.from_dict(cfg["model"]) == load_model_config(name)


def test_default_run_is_the_tiny_lrkv_on_the_embedded_corpus():
    cfg = resolve(compose_train([]))
    assert cfg["model"]["name"] == "lrkv_tiny" and cfg["data"]["source"] == "embedded"
    assert cfg["data"]["seq_len"] == cfg["model"]["max_seq_len"]
    assert cfg["trainer"]["precision"] == "auto"
    accumulate, tokens, steps = batch_plan(cfg["train"], cfg["data"]["batch_size"], cfg["data"]["seq_len"], 1)
    assert tokens == cfg["train"]["batch_tokens"] and steps == cfg["train"]["max_steps"]


def test_kv_bytes_of_presets_are_reported_in_bf16():
    cfg = load_model_config("lrkv_1b")
    assert cfg.kv_cache_bytes_per_token(torch.bfloat16) == 2 * cfg.n_layer * (2 * 128 + 2 * 12 * 51)


def test_presets_are_composed_from_one_size_and_one_kind(tmp_path, monkeypatch):
    """Each size's shape lives in configs/model/size/ only: editing it changes every kind of that size."""
    import shutil

    shape = ("n_layer", "n_head", "d_model", "head_dim", "vocab_size", "max_seq_len")
    for name in list_presets():
        text = (CONFIGS / "model" / f"{name}.yaml").read_text()
        assert not any(f"\n{key}:" in text for key in shape), f"{name} repeats a shape field"
    shutil.copytree(CONFIGS, tmp_path / "configs")
    size_file = tmp_path / "configs" / "model" / "size" / "tiny.yaml"
    size_file.write_text(size_file.read_text().replace("n_layer: 4", "n_layer: 3"))
    monkeypatch.setenv("LRKV_CONFIG_DIR", str(tmp_path / "configs"))
    kinds = [name for name in list_presets() if name.endswith("_tiny")]
    assert len(kinds) >= 5 and all(load_model_config(name).n_layer == 3 for name in kinds)
    assert load_model_config("lrkv_1b", rank=32).n_layer == 40
