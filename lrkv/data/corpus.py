"""Corpora: documents (str) from a source, split deterministically into train and validation.

A source is one string:

- ``"embedded"``: text that ships with Python, no download. ``"embedded:topics"`` is the help text
  of ``pydoc_data.topics`` (one document per topic); ``"embedded:docstrings"`` is the docstrings
  of the standard library's modules, read with ``ast`` (nothing is imported or executed; one document
  per module); ``"embedded"`` is both. ``"embedded:stdlib_code"`` is a larger corpus on its own: the
  source of every ``.py`` file of the installed standard library (its ``test`` package included when
  the interpreter ships it; ``site-packages`` left out), one document per file, held out by a keyed
  hash of the file's path relative to the standard library (not of its text), so that a file keeps
  its side when its text changes between Python versions. The text depends on the Python version
  (it is part of the corpus key) and is never copied into the repository.
- a local path: a file, a directory (searched recursively) or a glob of ``.txt``, ``.jsonl``,
  ``.json`` or ``.parquet`` files, read through ``datasets.load_dataset`` ("text", "json",
  "parquet" builders). A ``.txt`` file is one document (``txt_unit="document"``) or one document
  per blank-line-separated block (``txt_unit="paragraph"``).
- ``"hf:owner/name"`` (or a bare ``"owner/name"`` that is not a local path): a Hugging Face hub
  dataset, streamed. ``hf:`` followed by a local directory runs the same code path on local files.

Held-out split: unless ``val_split`` names explicit validation data, a document goes to validation
when a keyed hash of its text falls below ``val_fraction``. Hashing the text (not the position)
makes the split independent of reading order and sharding, and puts duplicates on the same side.
The split has its own seed (``split_seed``) so that changing the training seed keeps the same
validation set.
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import itertools
import logging
import os
import re
import socket
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

from lrkv.errors import ConfigError, DataError

EMBEDDED_PARTS = ("topics", "docstrings", "stdlib_code")
LOCAL_EXTENSIONS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLITS = ("train", "val")
# Standard-library folders left out of the docstring corpus: tests, vendored packages, and the
# generated codec modules whose docstrings are all alike.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
# Left out of the source-code corpus: third-party packages and bytecode only.
_STDLIB_CODE_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_FIX = (
    "no network? use data=embedded or a local path (file, directory or glob of "
    ".txt/.jsonl/.json/.parquet); set HF_DATASETS_OFFLINE=1 to fail fast offline"
)


@dataclass(frozen=True)
class CorpusSpec:
    """Where documents come from and how they are split; plain values so Hydra can fill it.

    source: "embedded[:topics|:docstrings]", a local file/directory/glob, or "hf:owner/name".
    name: dataset configuration on the hub (e.g. "sample-10BT"); None for local sources.
    split: the dataset split holding the training documents (hub or ``hf:<dir>`` only).
    val_split: explicit validation data: a split name for hub sources, or a file/directory/glob
        for local sources. None holds out ``val_fraction`` of the documents by hash.
    val_fraction: share of documents held out for validation when ``val_split`` is None.
    split_seed: key of the held-out hash; keep it fixed across runs that must be comparable.
    text_field: column holding the text in json/parquet/hub rows.
    txt_unit: "document" (one per .txt file) or "paragraph" (one per blank-line-separated block).
    streaming: read through ``datasets`` streaming (no Arrow copy on disk); False builds the
        Arrow cache, which local files allow and large hub datasets make slow.
    max_documents: read only the first N documents of the source (before the split): small runs.
    val_documents: hold out the first N documents of the source as validation (training reads the
        rest) instead of ``val_fraction`` by hash: for streamed corpora, where finding a small hashed
        fraction would mean reading the whole stream.
    """

    source: str = "embedded"
    name: str | None = None
    split: str = "train"
    val_split: str | None = None
    val_fraction: float = 0.05
    split_seed: int = 0
    text_field: str = "text"
    txt_unit: str = "document"
    streaming: bool = True
    max_documents: int | None = None
    val_documents: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} is outside [0, 1): use e.g. 0.05")
        if self.txt_unit not in ("document", "paragraph"):
            raise ConfigError(f"txt_unit={self.txt_unit!r} is unknown: use 'document' or 'paragraph'")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"max_documents={self.max_documents} must be >= 1 or None")
        if self.val_documents is not None and (self.val_documents < 1 or self.val_split is not None):
            raise ConfigError(f"val_documents={self.val_documents} must be >= 1, and cannot be combined with val_split")


def source_kind(source: str) -> str:
    """Classify a source string as "embedded", "hub" or "local" (see the module docstring)."""
    if source == "embedded" or source.startswith("embedded:"):
        return "embedded"
    if source.startswith("hf:"):
        return "hub"
    looks_local = (
        os.path.exists(source)
        or source.startswith(("/", ".", "~"))
        or glob.has_magic(source)
        or os.path.splitext(source)[1] in LOCAL_EXTENSIONS
    )
    return "hub" if not looks_local and _HUB_NAME.match(source) else "local"


def iter_documents(spec: CorpusSpec, split: str = "train", *, hf_cache_dir: str | None = None) -> Iterator[str]:
    """Yield the non-empty documents of one split ("train" or "val") of a corpus, in source order.

    Deterministic: the same spec gives the same documents in the same order on every run and rank.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is unknown: use 'train' or 'val'")
    kind = source_kind(spec.source)
    explicit_val = spec.val_split is not None
    if explicit_val and kind == "embedded":
        raise ConfigError("val_split is not available for the embedded corpus: use val_fraction")
    if split == "val" and explicit_val:
        docs = _read_source(spec, kind, spec.val_split, hf_cache_dir)
    else:
        docs = _read_source(spec, kind, None, hf_cache_dir)
    if spec.max_documents is not None:
        docs = _take(docs, spec.max_documents)
    if spec.val_documents is not None:  # held out by position: the head of the stream
        yield from (
            _take(docs, spec.val_documents) if split == "val" else itertools.islice(docs, spec.val_documents, None)
        )
        return
    if spec.source == "embedded:stdlib_code":  # held out by a hash of the file's path
        for path, text in stdlib_code_files()[: spec.max_documents]:
            if is_validation(path, spec.val_fraction, spec.split_seed) == (split == "val"):
                yield text
        return
    for text in docs:
        if explicit_val or is_validation(text, spec.val_fraction, spec.split_seed) == (split == "val"):
            yield text


def is_validation(text: str, val_fraction: float, split_seed: int = 0) -> bool:
    """True when the document belongs to the held-out split: keyed hash of its text (or of the key that
    stands for it, such as a file path) < fraction."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(
        text.encode("utf-8"), digest_size=8, key=split_seed.to_bytes(8, "little", signed=True)
    ).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def corpus_key(spec: CorpusSpec) -> dict:
    """What determines the documents, for cache keys: the spec, plus the Python version for the
    embedded corpus and (path, size, mtime) of every local file, so edited files miss the cache."""
    key: dict = {"spec": asdict(spec)}
    kind = source_kind(spec.source)
    if kind == "embedded":
        key["python"] = list(sys.version_info[:3])
    elif kind == "local":
        paths = resolve_data_files(spec.source)
        if spec.val_split is not None:
            paths += resolve_data_files(spec.val_split)
        key["files"] = [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]
    return key


# --------------------------------------------------------------------------- embedded corpus


def embedded_documents(part: str = "all") -> list[str]:
    """The embedded corpus: ``pydoc_data`` topics and/or standard-library docstrings, sorted."""
    if part == "all":
        return _topics() + _stdlib_docstrings()
    if part == "topics":
        return _topics()
    if part == "docstrings":
        return _stdlib_docstrings()
    if part == "stdlib_code":
        return [text for _, text in stdlib_code_files()]
    raise ConfigError(
        f"embedded part {part!r} is unknown: use 'embedded', " + ", ".join(f"'embedded:{p}'" for p in EMBEDDED_PARTS)
    )


@functools.lru_cache(maxsize=1)
def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings() -> list[str]:
    """One document per standard-library module: its docstrings in source order, blank-line joined.

    Parses source files with ``ast`` (no import, so no side effects); a file that does not parse
    under this Python is skipped. About 4 s on one core; cached for the process.
    """
    root = sysconfig.get_paths()["stdlib"]
    documents = []
    for path in _python_files(root):
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=path)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        text = "\n\n".join(_docstrings_in_order(tree))
        if text.strip():
            documents.append(text)
    return documents


@functools.lru_cache(maxsize=1)
def stdlib_code_files() -> tuple[tuple[str, str], ...]:
    """(path relative to the standard library, source text) of every ``.py`` file, in walk order (each folder's
    files sorted by name, then its sub-folders sorted by name).

    Files that are not valid UTF-8 (a few test fixtures) or are empty are skipped; the text is the file's
    as is (no parsing). About 1 s for ~1,800 files (~32 MB with the test package); cached for the process.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for path in _python_files(root, _STDLIB_CODE_SKIP_DIRS):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            files.append((os.path.relpath(path, root).replace(os.sep, "/"), text))
    return tuple(files)


def _python_files(root: str, skip: set[str] = _STDLIB_SKIP_DIRS) -> list[str]:
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in skip)
        found += [os.path.join(directory, f) for f in sorted(files) if f.endswith(".py")]
    return found


def _docstrings_in_order(node: ast.AST) -> Iterator[str]:
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings_in_order(child)


# --------------------------------------------------------------------------- local files


def resolve_data_files(path: str) -> list[str]:
    """Sorted data files for a file, a directory (recursive) or a glob; DataError if none."""
    expanded = os.path.expanduser(path)
    if glob.has_magic(expanded):
        files = sorted(f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(expanded):
        files = sorted(
            os.path.join(d, f)
            for d, _, names in os.walk(expanded)
            for f in names
            if os.path.splitext(f)[1] in LOCAL_EXTENSIONS
        )
    elif os.path.isfile(expanded):
        files = [expanded]
    else:
        raise DataError(f"data path {path!r} does not exist: fix the path, or use data=embedded")
    if not files:
        raise DataError(
            f"no .txt/.jsonl/.json/.parquet files under {path!r}: point data.source at such files, or use data=embedded"
        )
    return files


def _builder_for(files: list[str]) -> str:
    builders = {LOCAL_EXTENSIONS.get(os.path.splitext(f)[1]) for f in files}
    if None in builders:
        odd = next(f for f in files if os.path.splitext(f)[1] not in LOCAL_EXTENSIONS)
        raise DataError(f"unsupported file type {odd!r}: use .txt, .jsonl, .json or .parquet")
    if len(builders) > 1:
        raise DataError(
            f"mixed file types ({', '.join(sorted(builders))}) in one source: point data.source at one kind of file"
        )
    return builders.pop()


def _read_local(spec: CorpusSpec, path: str, hf_cache_dir: str | None) -> Iterator[str]:
    import datasets

    files = resolve_data_files(path)
    builder = _builder_for(files)
    kwargs = {"sample_by": spec.txt_unit} if builder == "text" else {}
    text_field = "text" if builder == "text" else spec.text_field
    try:
        rows = datasets.load_dataset(
            builder, data_files=files, split="train", streaming=spec.streaming, cache_dir=hf_cache_dir, **kwargs
        )
        yield from _texts(rows, text_field, path)
    except (DataError, ConfigError):
        raise
    except Exception as e:  # malformed json, unreadable parquet, ...: raised by datasets/pyarrow
        raise DataError(
            f"cannot read {path!r} as {builder}: {type(e).__name__}: "
            f"{_first_line(e)}; check the files are valid {builder} files"
        ) from e


# --------------------------------------------------------------------------- hub datasets


def offline_flag() -> str | None:
    """ "HF_HUB_OFFLINE=1" (or HF_DATASETS_OFFLINE) when the user asked for offline mode, else None."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    return None


def probe_hub(timeout: float = 3.0) -> str | None:
    """Why the hub endpoint cannot be reached, or None: one TCP connection attempt, so that a
    machine without network fails in seconds instead of after huggingface_hub's retries.
    Skipped behind a proxy, where a direct connection may be blocked although the hub works."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{endpoint.hostname}:{port} unreachable: {_first_line(e)}"
    return None


def _read_hub(spec: CorpusSpec, split: str, hf_cache_dir: str | None) -> Iterator[str]:
    import datasets

    name = spec.source[3:] if spec.source.startswith("hf:") else spec.source
    is_local_dir = os.path.isdir(os.path.expanduser(name))
    config = f"config {spec.name!r}, " if spec.name else ""
    where = f"{name!r} ({config}split {split!r})"
    if not spec.source.startswith("hf:"):
        where += ", which is no local path either"
    # Offline means no hub at all (a copy on disk is a local path: use it as the source).
    if not is_local_dir and (reason := offline_flag() or probe_hub()):
        raise DataError(f"cannot reach the Hugging Face hub for dataset {where}: {reason}; {_FIX}")
    try:
        rows = datasets.load_dataset(
            os.path.expanduser(name), spec.name, split=split, streaming=spec.streaming, cache_dir=hf_cache_dir
        )
        yield from _texts(rows, spec.text_field, name)
    except (DataError, ConfigError):
        raise
    except Exception as e:  # connection, auth, missing dataset/config/split: all end the run
        raise DataError(
            f"cannot read dataset {where}: {type(e).__name__}: {_first_line(e)}; "
            f"check the name, config and split; {_FIX}"
        ) from e


# --------------------------------------------------------------------------- helpers


def _read_source(spec: CorpusSpec, kind: str, val_split: str | None, hf_cache_dir: str | None) -> Iterator[str]:
    if kind == "embedded":
        part = spec.source.partition(":")[2] or "all"
        return iter(embedded_documents(part))
    if kind == "local":
        return _read_local(spec, val_split or spec.source, hf_cache_dir)
    return _read_hub(spec, val_split or spec.split, hf_cache_dir)


def _texts(rows: Iterable[dict], field: str, where: str) -> Iterator[str]:
    """The non-empty string values of one column. Rows without the column, empty rows and undecodable
    rows (bytes that are not UTF-8, or no text at all) are skipped and counted: after a full pass the
    run is told "skipped N of M documents" (once per source), and a source with nothing left is a
    DataError naming the columns it has."""
    total, skipped, columns = 0, {"without the column": 0, "empty": 0, "undecodable": 0}, None
    for row in rows:
        total += 1
        if field not in row:
            skipped["without the column"] += 1
            columns = columns or list(row)
            if skipped["without the column"] == total == FIELD_PROBE_ROWS:  # a wrong column: fail fast
                raise DataError(
                    f"no column {field!r} in the first {total} rows of {where!r} (columns: {', '.join(row)}): "
                    "set data.text_field to the column holding the text"
                )
            continue
        text = row[field]
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                skipped["undecodable"] += 1
                continue
        if text is None:  # json rows: datasets fills a column missing from a row with null
            skipped["without the column"] += 1
            continue
        if not isinstance(text, str):
            skipped["undecodable"] += 1
            continue
        if not text:
            skipped["empty"] += 1
            continue
        yield text
    _report_skipped(where, field, total, skipped, columns)


_REPORTED: set[str] = set()
FIELD_PROBE_ROWS = 100  # this many leading rows without the text column: the column name is wrong


def _report_skipped(where: str, field: str, total: int, skipped: dict, columns: list | None) -> None:
    count = sum(skipped.values())
    if not count:
        return
    why = ", ".join(
        f"{n} {reason}" + (f" {field!r}" if reason == "without the column" else "")
        for reason, n in skipped.items()
        if n
    )
    if count == total:
        hint = (
            f" (columns: {', '.join(columns)}): set data.text_field to the column holding the text" if columns else ""
        )
        raise DataError(f"{where!r}: all {total} documents were skipped ({why}){hint}")
    message = f"{where!r}: skipped {count} of {total} documents ({why})"
    if message not in _REPORTED:  # the same pass runs for the tokenizer, the tokens and each split
        _REPORTED.add(message)
        logging.getLogger("lrkv").warning(message)


def _take(items: Iterable[str], n: int) -> Iterator[str]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
