"""lrkv.io: what is at a path, and the one loader; the import graph has no cycles."""

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import random_model

import lrkv
from lrkv import CheckpointError, ConfigError
from lrkv.io import load_pretrained, logged_val_loss, metric_columns, read_metrics, resolve
from lrkv.measure import kv_cache_bytes, loss_sums
from lrkv.training.checkpoint import save_pretrained

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- formats ---------------------------------------------------------------------------------------
def write_lightning_ckpt(path: Path, model, step: int) -> Path:
    """A checkpoint file in the layout train.py writes (LanguageModel.model = the Transformer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": model.cfg.to_dict()}, "global_step": step}, path)
    return path


def write_sharded_ckpt(folder: Path, model, step: int) -> Path:
    """An FSDP checkpoint folder: torch.distributed.checkpoint shards plus meta.pt (as Lightning writes it)."""
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {"model." + k: v for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save({"hyper_parameters": {"model": model.cfg.to_dict()}, "global_step": step}, folder / "meta.pt")
    return folder


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resolve_and_load_every_format(tmp_path):
    model = random_model("lrkv")
    run = tmp_path / "run"
    pre = save_pretrained(model, run / "pretrained")
    (run / "summary.json").write_text(json.dumps({"steps": 80}))
    ckpt = write_lightning_ckpt(run / "checkpoints" / "step-00000040.ckpt", model, 40)
    sharded = write_sharded_ckpt(tmp_path / "sharded", model, 60)
    only_ckpts = tmp_path / "stopped"  # a run stopped before it exported pretrained/: last.ckpt is read
    write_lightning_ckpt(only_ckpts / "checkpoints" / "step-00000020.ckpt", model, 20)
    (only_ckpts / "checkpoints" / "last.ckpt").symlink_to("step-00000020.ckpt")

    cases = [
        (run, "pretrained", pre, 80),  # a run folder: the exported model, at the run's last step
        (pre, "pretrained", pre, 80),
        (ckpt, "checkpoint", ckpt, 40),
        (sharded, "sharded", sharded, 60),
        (only_ckpts, "checkpoint", only_ckpts / "checkpoints" / "step-00000020.ckpt", 20),
    ]
    for path, kind, target, step in cases:
        found = resolve(path)
        assert (found.kind, found.path.resolve()) == (kind, target.resolve()), path
        loaded = load_pretrained(path)
        assert same_weights(loaded.model, model) and not loaded.model.training
        assert loaded.step == step, path
    # the public loader: (model, tokenizer), cast on request
    m, tok = lrkv.load_pretrained(run, dtype="bfloat16")
    assert tok is None and next(m.parameters()).dtype == torch.bfloat16


def test_paths_that_hold_no_model_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, words in [
        (tmp_path / "nothing", "does not exist"),
        (tmp_path / "empty", "holds no model"),
        ("", "no checkpoint path given"),
    ]:
        with pytest.raises((CheckpointError, ConfigError)) as err:
            resolve(path)
        assert words in str(err.value) and "\n" not in str(err.value)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_pretrained(bad)
    with pytest.raises(ConfigError, match="dtype 'int7' is unknown"):
        load_pretrained(save_pretrained(random_model("mha"), tmp_path / "p"), dtype="int7")


def test_metrics_reader_and_the_loss_logged_at_a_step(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "step,tokens,train_loss,val_loss,val_bpb\n10,100,4.0,,\n20,200,3.5,3.6,1.8\n30,300,3.0,,\n"
    )
    rows = read_metrics(tmp_path)
    assert rows == [
        {"step": 10, "tokens": 100, "train_loss": 4.0},
        {"step": 20, "tokens": 200, "train_loss": 3.5, "val_loss": 3.6, "val_bpb": 1.8},
        {"step": 30, "tokens": 300, "train_loss": 3.0},
    ]
    assert read_metrics(tmp_path / "metrics.csv") == rows and read_metrics(tmp_path / "none") == []
    assert metric_columns(rows)["val_loss"] == [None, 3.6, None]
    assert logged_val_loss(tmp_path, 20) == {"step": 20, "val_loss": 3.6, "val_bpb": 1.8}
    assert logged_val_loss(tmp_path, 30) is None and logged_val_loss(tmp_path, None) is None


# ---- measurements shared by training and evaluation -----------------------------------------------
def test_loss_sums_equal_the_direct_sum():
    model = random_model("mha")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 97, (3, 9), generator=g)
    token_bytes = torch.randint(1, 5, (97,), generator=g)
    batch = {"input": x[:, :-1], "target": x[:, 1:]}
    with torch.no_grad():
        nats, tokens, nbytes = loss_sums(model, batch, token_bytes).tolist()
        direct = model.loss(x[:, :-1], x[:, 1:], reduction="sum").double().item()
    assert nats == pytest.approx(direct, rel=1e-6) and tokens == 24 and nbytes == token_bytes[x[:, 1:]].sum()
    with_rows = {**batch, "bytes": torch.tensor([1, 2, 3])}  # the data loader's per-row bytes win when given
    with torch.no_grad():
        assert loss_sums(model, with_rows, token_bytes)[2].item() == 6
        masked = {"input": x[:, :-1], "target": x[:, 1:].masked_fill(x[:, 1:] > 50, -1)}
        _, tokens, nbytes = loss_sums(model, masked, token_bytes).tolist()
    assert tokens == int((x[:, 1:] <= 50).sum()) and nbytes == token_bytes[x[:, 1:][x[:, 1:] <= 50]].sum()


def test_kv_bytes_are_measured_from_a_real_cache():
    for kind in ("mha", "gqa", "mla", "lrkv"):
        cfg = random_model(kind).cfg
        kv = kv_cache_bytes(cfg, torch.bfloat16, context=16, batch_size=2)
        assert kv.per_token == cfg.kv_cache_bytes_per_token(torch.bfloat16)
        assert kv.allocated == kv.per_token * 16 * 2


# ---- the import graph ------------------------------------------------------------------------------
def lrkv_modules() -> dict[str, Path]:
    mods = {}
    for f in sorted((REPO / "lrkv").rglob("*.py")):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def imports_of(name: str, path: Path, mods: dict) -> set[str]:
    """lrkv modules that `name` imports anywhere in its file (at the top or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in mods and m != name}


def find_cycle(graph: dict[str, set]) -> list | None:
    state, stack = {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if not state.get(v) and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_between_modules_or_packages():
    """Lazy (in-function) imports count too: they are how the earlier cycles (training.checkpoint <->
    training.resume, training <-> compress) were hidden."""
    mods = lrkv_modules()
    graph = {name: imports_of(name, path, mods) for name, path in mods.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"

    def package(m):
        return ".".join(m.split(".")[:2])

    packages: dict[str, set] = {}
    for name, targets in graph.items():
        packages.setdefault(package(name), set()).update(package(t) for t in targets if package(t) != package(name))
    assert find_cycle(packages) is None, f"package cycle: {' -> '.join(find_cycle(packages))}"
    # the layering: model code and io below training; training below compress and evaluation
    assert not packages["lrkv.io"] & {"lrkv.training", "lrkv.compress", "lrkv.evaluation"}
    assert not packages["lrkv.training"] & {"lrkv.compress", "lrkv.evaluation"}


@pytest.mark.slow
def test_every_module_imports_on_its_own_and_lrkv_stays_light():
    """In a fresh process: `import lrkv` pulls in neither Lightning, Hydra nor lrkv.io; then every lrkv module
    imports first (all lrkv modules dropped before each), so that no module depends on an import order."""
    names = sorted(lrkv_modules())
    code = f"""
import importlib, sys
import lrkv
heavy = [m for m in ("lightning", "hydra", "lrkv.io", "lrkv.training") if m in sys.modules]
assert not heavy, heavy
for name in {names!r}:
    for m in [m for m in sys.modules if m.split(".")[0] in ("lrkv", "lm_eval")]:  # lm_eval: its model registry
        del sys.modules[m]
    importlib.import_module(name)
print("ok", len({names!r}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"ok {len(names)}"
