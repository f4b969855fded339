"""Data mixtures: `data=mixture` draws every training window from one of several sources, by weight.

    data.sources: [{name: web, source: /data/a.jsonl, weight: 0.75}, {name: code, source: /data/b, weight: 0.25}]

Each source is a corpus as `data=local` / `data=fineweb_edu` / `data=embedded` accept it (a local file,
folder or glob, "hf:owner/name", "embedded[:part]"), with its own optional `text_field`, `config` (the
hub dataset's configuration name), `split`, `val_split`, `val_fraction`, `val_documents`,
`max_documents`, `max_tokens`, `val_max_tokens`, `txt_unit` and `format` ("text"). Its documents are
tokenized, packed and split exactly like a single corpus; source s has its own seeded stream of
windows (a `BatchLoader` of one row, seed derived from (seed, s)).

Sampling. Global training rows are numbered g = 0, 1, 2, ... in the order the data-parallel layout of
`BatchLoader` uses (batch k, row j, rank r: g = (k B + j) W + r). Row g draws its source from the
normalised weights p_s = w_s / sum w with a generator seeded by (seed, g // BLOCK), and takes the next
unused window of that source: the c-th window of source s, where c counts the earlier rows that drew s.
Every rank computes the same draws (cheap: one categorical draw per row) and reads only its own rows,
so the ranks together read each source's windows once, in order, and the mixture depends only on
the seed (not on the number of processes or workers). A weight of 0 keeps a source for validation
only.

State (exact resume): `{"kind": "mixture", "rows": g, "sources": [{"name", "weight", "windows": c_s,
"position": the source loader's state after c_s windows}, ...]}` plus the settings it is valid for.
It is the same on every rank (it is global) and restores every rank's position; the datamodule
stores it in each checkpoint like the single-corpus loader state.

Validation: each source's own held-out windows (at most `val_batches` batches per source), one
source after another, each batch tagged with its source id; the training loop reports `val_loss`
and `val_bpb` over all of them (token-weighted) and `val_loss/<name>` per source. Tokens drawn per
source (`tokens/<name>`) follow from the state: windows x seq_len, summed over all ranks.

Storage: every source's tokens are held as `data.storage` says (lrkv/data/tokens.py): `memory`, or
`shards` (each source tokenized once into its own cached, memory-mapped shards; a hub source then needs
no `max_tokens`). `stream` is not supported for mixtures. Documents of all sources train one BPE when
tokenizer=bpe.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from lrkv.data.corpus import EMBEDDED_PARTS, CorpusSpec, corpus_key, iter_documents, resolve_data_files, source_kind
from lrkv.data.loader import BatchLoader
from lrkv.data.tokens import split_tokens
from lrkv.errors import ConfigError, DataError

MIXTURE = "mixture"
BLOCK = 4096  # rows drawn per generator: row g's source comes from rng(seed, g // BLOCK)
_STATE_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
FORMATS = ("text", "chat", "mmlu", "gsm8k")  # chat formats: lrkv/data/chat.py (assistant-only loss)


@dataclass(frozen=True)
class SourceSpec:
    """One source of a mixture (see the module docstring for the fields)."""

    name: str
    source: str
    weight: float
    text_field: str = "text"
    format: str = "text"
    config: str | None = None  # hub dataset configuration (CorpusSpec.name)
    split: str = "train"
    val_split: str | None = None
    val_fraction: float | None = None  # default: data.val_fraction
    val_documents: int | None = None
    max_documents: int | None = None
    max_tokens: int | None = None
    val_max_tokens: int | None = None
    txt_unit: str = "document"

    def corpus(self, val_fraction: float, split_seed: int) -> CorpusSpec:
        return CorpusSpec(
            source=self.source,
            name=self.config,
            split=self.split,
            val_split=self.val_split,
            val_fraction=val_fraction if self.val_fraction is None else self.val_fraction,
            split_seed=split_seed,
            text_field=self.text_field,
            txt_unit=self.txt_unit,
            max_documents=self.max_documents,
            val_documents=self.val_documents,
        )


def is_mixture(source, sources) -> bool:
    return source == MIXTURE or bool(sources)


def parse_sources(sources, *, val_fraction: float = 0.05, split_seed: int = 0) -> list[SourceSpec]:
    """Validated SourceSpecs from `data.sources` (a list of dicts); one-line ConfigError / DataError otherwise."""
    example = "data.sources=[{name:web,source:/data/a.jsonl,weight:0.75},{name:code,source:/data/b,weight:0.25}]"
    if not isinstance(sources, (list, tuple)) or not sources:
        raise ConfigError(f"data=mixture needs a non-empty list of sources, e.g. '{example}'")
    known = [f.name for f in fields(SourceSpec)]
    specs, names = [], set()
    for i, entry in enumerate(sources):
        where = f"data.sources[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping {{name, source, weight, ...}}, got {entry!r}")
        unknown = sorted(set(entry) - set(known))
        if unknown:
            raise ConfigError(f"{where} has unknown key {unknown[0]!r}; known keys: {', '.join(known)}")
        for key in ("name", "source", "weight"):
            if entry.get(key) is None:
                raise ConfigError(f"{where} needs {key} (each source is {{name, source, weight}}, e.g. '{example}')")
        name = str(entry["name"])
        if not _NAME.match(name):
            raise ConfigError(f"{where}: name {name!r} must be letters, digits, '_', '-' or '.' (it names columns)")
        if name in names:
            raise ConfigError(f"{where}: source name {name!r} is used twice; give every source its own name")
        names.add(name)
        weight = entry["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{where} ({name}) has weight {weight!r}; weights must be finite numbers >= 0")
        fmt = entry.get("format", "text")
        if fmt not in FORMATS:
            raise ConfigError(f"{where} ({name}): format={fmt!r} is unknown; use {', '.join(FORMATS)}")
        if fmt != "text" and source_kind(str(entry["source"])) == "embedded":
            raise ConfigError(f"{where} ({name}): format={fmt} needs conversations; the embedded corpus is plain text")
        spec = SourceSpec(**{**entry, "name": name, "weight": float(weight), "source": str(entry["source"])})
        try:
            spec.corpus(val_fraction, split_seed)  # CorpusSpec's own checks
            check_source_exists(spec.source)
        except (ConfigError, DataError) as e:
            raise type(e)(f"{where} ({name}): {e}") from None
        specs.append(spec)
    if sum(s.weight for s in specs) <= 0:
        raise ConfigError("data.sources weights are all zero; give at least one source a positive weight")
    return specs


def check_source_exists(source: str) -> None:
    """Unknown sources fail before any reading: a local path must exist, an embedded part must be known."""
    kind = source_kind(source)
    if kind == "embedded" and source != "embedded":
        part = source.split(":", 1)[1]
        if part not in EMBEDDED_PARTS:
            raise ConfigError(
                f"embedded part {part!r} is unknown: use 'embedded', "
                + ", ".join(f"'embedded:{p}'" for p in EMBEDDED_PARTS)
            )
    elif kind == "local":
        resolve_data_files(source)


def source_seed(seed: int, index: int) -> int:
    """Seed of source `index`'s window stream (independent streams per source)."""
    return int(np.random.SeedSequence([seed, index, 7]).generate_state(1)[0])


class Mixture:
    """The sources of a mixture with their corpora: documents for the tokenizer, loaders for training."""

    def __init__(
        self,
        sources,
        *,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        storage: str = "memory",
        cache_dir: str = ".cache/lrkv",
    ):
        self.storage, self.cache_dir = storage, cache_dir  # how each source's tokens are held (lrkv/data/tokens.py)
        self.specs = parse_sources(sources, val_fraction=val_fraction, split_seed=split_seed)
        for spec in self.specs:
            if storage == "memory" and source_kind(spec.source) == "hub" and spec.max_tokens is None:
                raise ConfigError(
                    f"data.sources {spec.name!r} streams a hub dataset into memory: give it max_tokens, "
                    "or set data.storage=shards (tokenized once into cache_dir)"
                )
        self.corpora = [s.corpus(val_fraction, split_seed) for s in self.specs]
        total = sum(s.weight for s in self.specs)
        self.probabilities = np.array([s.weight / total for s in self.specs])

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def key(self) -> dict:
        """Cache key of the mixture's documents (every source's corpus key)."""
        return {MIXTURE: [corpus_key(c) for c in self.corpora]}

    def documents(self, split: str = "train") -> Iterator[str]:
        """Every source's documents, round-robin (the tokenizer's training text)."""
        streams = [iter_documents(c, split) for c in self.corpora]
        for group in itertools.zip_longest(*streams):
            yield from (d for d in group if d is not None)

    def tokens(self, i: int, split: str, tokenizer, seed: int = 0):
        """Source i's tokens of a split, held as `storage` says (shards: written on first use)."""
        spec = self.specs[i]
        return _checked(
            spec,
            lambda: split_tokens(
                self.corpora[i],
                split,
                tokenizer,
                fmt=spec.format,
                storage=self.storage,
                max_tokens=spec.max_tokens,
                val_max_tokens=spec.val_max_tokens,
                cache_dir=self.cache_dir,
                seed=seed,
            ),
        )

    def train_loader(self, tokenizer, *, seq_len, batch_size, seed, rank, world_size, token_bytes) -> MixtureLoader:
        loaders = []
        for i, spec in enumerate(self.specs):
            s = source_seed(seed, i)
            tokens = self.tokens(i, "train", tokenizer, seed=s)
            if spec.weight == 0 and tokens.num_tokens() < seq_len + 1:
                tokens = None  # a validation-only source needs no training windows
            loaders.append(
                None
                if tokens is None
                else _checked(
                    spec,
                    lambda t=tokens, s=s: BatchLoader(
                        t, seq_len=seq_len, batch_size=1, seed=s, shuffle=True, infinite=True, token_bytes=token_bytes
                    ),
                )
            )
        return MixtureLoader(
            self, loaders, seq_len=seq_len, batch_size=batch_size, seed=seed, rank=rank, world=world_size
        )

    def val_loader(
        self, tokenizer, *, seq_len, batch_size, rank, world_size, token_bytes, max_batches
    ) -> MixtureValLoader:
        loaders = []
        for i, spec in enumerate(self.specs):
            tokens = self.tokens(i, "val", tokenizer)
            loaders.append(
                _checked(
                    spec,
                    lambda t=tokens: BatchLoader(
                        t,
                        seq_len=seq_len,
                        batch_size=batch_size,
                        shuffle=False,
                        infinite=False,
                        rank=rank,
                        world_size=world_size,
                        token_bytes=token_bytes,
                        max_batches=max_batches,
                    ),
                )
            )
        return MixtureValLoader(loaders)


def _checked(spec: SourceSpec, make):
    try:
        return make()
    except DataError as e:
        raise DataError(f"data.sources {spec.name!r}: {e}") from None


class MixtureLoader:
    """Training batches of a mixture, with `BatchLoader`'s interface (iter_batches, state_dict,
    load_state_dict, state_after, iteration), so the datamodule and DataLoader workers use it unchanged."""

    def __init__(
        self, mixture: Mixture, loaders: list, *, seq_len: int, batch_size: int, seed: int, rank: int, world: int
    ):
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise ConfigError(f"bad batch layout: batch_size={batch_size}, rank={rank}, world_size={world}")
        self.mixture, self.loaders = mixture, loaders
        self.seq_len, self.batch_size, self.seed, self.rank, self.world = seq_len, batch_size, seed, rank, world
        self.infinite = True
        self._blocks: dict[int, np.ndarray] = {}
        self._rows, self._counts = 0, [0] * len(loaders)

    # ---- draws ----------------------------------------------------------------------------------
    def _block(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            if len(self._blocks) > 4:
                self._blocks.clear()
            rng = np.random.default_rng([self.seed, b, 11])
            self._blocks[b] = rng.choice(len(self.loaders), size=BLOCK, p=self.mixture.probabilities)
        return self._blocks[b]

    def _draws(self, start: int, n: int) -> np.ndarray:
        """Sources of global rows start .. start + n - 1."""
        out, g = [], start
        while g < start + n:
            b, offset = divmod(g, BLOCK)
            take = min(BLOCK - offset, start + n - g)
            out.append(self._block(b)[offset : offset + take])
            g += take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _advance(self, rows: int, counts: list[int], n_rows: int) -> tuple[int, list[int]]:
        draws = self._draws(rows, n_rows)
        new = np.bincount(draws, minlength=len(counts))
        return rows + n_rows, [c + int(k) for c, k in zip(counts, new)]

    # ---- BatchLoader interface --------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.iter_batches(self.state_dict()):
            self._rows, self._counts = self._advance(self._rows, self._counts, self.batch_size * self.world)
            yield batch

    def iter_batches(self, start: dict | None = None, first: int = 0, stride: int = 1) -> Iterator[dict]:
        rows, counts = self._position_of(start) if start is not None else (0, [0] * len(self.loaders))
        per_batch = self.batch_size * self.world
        rows, counts = self._advance(rows, counts, first * per_batch)
        while True:
            yield self._batch(rows, counts)
            rows, counts = self._advance(rows, counts, stride * per_batch)

    def _batch(self, rows: int, counts: list[int]) -> dict:
        draws = self._draws(rows, self.batch_size * self.world)
        seen = list(counts)
        picks = []  # (source, window index) of every global row of this batch
        for s in draws:
            picks.append((int(s), seen[s]))
            seen[s] += 1
        mine = picks[self.rank :: self.world]  # row j of this rank is global row j * world + rank
        parts = [next(iter(self.loaders[s].iter_batches(self.loaders[s].state_after(c)))) for s, c in mine]
        batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        batch["source"] = torch.tensor([s for s, _ in mine])
        return batch

    def state_dict(self) -> dict:
        return self._state(self._rows, self._counts)

    def load_state_dict(self, state: dict) -> None:
        self._rows, self._counts = self._position_of(state)

    def state_after(self, num_batches: int, start: dict | None = None) -> dict:
        rows, counts = self._position_of(start) if start is not None else (0, [0] * len(self.loaders))
        return self._state(*self._advance(rows, counts, num_batches * self.batch_size * self.world))

    def tokens_by_source(self, state: dict) -> dict[str, int]:
        """Training target tokens drawn from each source up to `state`, over all ranks."""
        return {s["name"]: s["windows"] * self.seq_len for s in state["sources"]}

    # ---- state ----------------------------------------------------------------------------------
    def _state(self, rows: int, counts: list[int]) -> dict:
        sources = []
        for spec, loader, c in zip(self.mixture.specs, self.loaders, counts):
            position = loader.state_after(c) if loader is not None else None
            sources.append({"name": spec.name, "weight": spec.weight, "windows": int(c), "position": position})
        return {
            "kind": MIXTURE,
            "version": _STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "rows": int(rows),
            "sources": sources,
        }

    def _position_of(self, state: dict) -> tuple[int, list[int]]:
        if not isinstance(state, dict) or state.get("kind") != MIXTURE:
            raise DataError("the checkpoint's data state is not a mixture position; resume with the run's data config")
        for key, value in (("version", _STATE_VERSION), ("seed", self.seed), ("seq_len", self.seq_len)):
            if state.get(key) != value:
                raise DataError(
                    f"mixture state was saved with {key}={state.get(key)!r}; resume with the same data settings"
                )
        saved = [(s["name"], s["weight"]) for s in state["sources"]]
        ours = [(s.name, s.weight) for s in self.mixture.specs]
        if saved != ours:
            raise DataError(
                f"mixture state was saved for sources {saved}, this run has {ours}; resume with the same data.sources"
            )
        rows, counts = int(state["rows"]), [int(s["windows"]) for s in state["sources"]]
        for loader, s in zip(self.loaders, state["sources"]):
            if loader is not None and s["position"] is not None:
                loader.state_after(0, s["position"])  # the source's own checks (token count, seq_len, seed)
        if sum(counts) != rows:
            raise DataError(f"mixture state is inconsistent (rows {rows} != sum of windows {sum(counts)})")
        return rows, counts


class MixtureValLoader:
    """Each source's validation batches in turn, tagged `"source": LongTensor([s] * rows)`; finite."""

    infinite = False

    def __init__(self, loaders: list[BatchLoader]):
        self.loaders = loaders

    def iter_batches(self, start: dict | None = None, first: int = 0, stride: int = 1) -> Iterator[dict]:
        batches = (
            {**batch, "source": torch.full((len(batch["input"]),), s, dtype=torch.long)}
            for s, loader in enumerate(self.loaders)
            for batch in loader.iter_batches()
        )
        return itertools.islice(batches, first, None, stride)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_batches()

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)


# ---- per-source validation sums (used by the training module) ------------------------------------------
def add_source_sums(sums: torch.Tensor | None, n_sources: int, source: int, batch_sums: torch.Tensor) -> torch.Tensor:
    """Add one validation batch's (nats, tokens, bytes) to row `source` of the (n_sources, 3) sums."""
    if sums is None:
        sums = torch.zeros(n_sources, 3, dtype=torch.float64, device=batch_sums.device)
    sums[source] += batch_sums.to(torch.float64)
    return sums


def source_metrics(sums: torch.Tensor, names: list[str]) -> dict[str, float]:
    """`val_loss/<name>` (and `val_bpb/<name>`) from summed (n_sources, 3) nats, tokens, bytes."""
    out = {}
    for name, (nats, tokens, nbytes) in zip(names, sums.tolist()):
        if tokens > 0:
            out[f"val_loss/{name}"] = nats / tokens
            if nbytes > 0:
                out[f"val_bpb/{name}"] = nats / (math.log(2) * nbytes)
    return out


def metric_columns(names: list[str]) -> list[str]:
    """metrics.csv columns a mixture adds."""
    return [f"tokens/{n}" for n in names] + [f"val_loss/{n}" for n in names] + [f"val_bpb/{n}" for n in names]


def describe(specs: list[SourceSpec]) -> list[dict]:
    return [asdict(s) for s in specs]
