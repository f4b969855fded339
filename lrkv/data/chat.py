"""Chat data: conversations -> a chat template with special tokens -> packed rows with a loss mask.

Conversations are ``messages`` lists of ``{"role", "content"}`` (SmolTalk's format), roles ``system``,
``user`` and ``assistant``. Small adapters render other rows into that form: MMLU-style rows
(``question``, ``choices``, ``answer`` index) and GSM8K-style rows (``question``, ``answer``).

Template (nanochat-style; the markers are special tokens added to the tokenizer, one id each, never
produced from text because the tokenizer encodes special-token strings in text as ordinary tokens):

    <|user_start|> user text <|user_end|> <|assistant_start|> reply <|assistant_end|> ...

A system message is prepended to the first user message (separated by a blank line). Rendering
returns ``(ids, mask)``: mask is 1 exactly on the assistant's content tokens and its
``<|assistant_end|>`` (what the model must learn to produce, including when to stop), 0 elsewhere.

Packing. Conversations are packed like documents (``lrkv.data.packing``: each followed by the
end-of-text id, cut into windows of seq_len + 1). The mask travels in the token stream itself: a
token that is not a training target is stored as ``~id`` (= -id - 1, a negative number), so the
ordinary loaders (document shuffling, window order, sharding, exact resume) carry it unchanged, and
``decode_window`` turns a window into ``input`` (ids) and ``target`` (-1 where masked, which
``Transformer.loss`` ignores). The loss is then the mean over assistant tokens only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import AddedToken

from lrkv.data.corpus import CorpusSpec, is_validation, resolve_data_files, source_kind
from lrkv.errors import ConfigError, DataError

USER_START, USER_END = "<|user_start|>", "<|user_end|>"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"
CHAT_TOKENS = (USER_START, USER_END, ASSISTANT_START, ASSISTANT_END)
FORMATS = ("chat", "mmlu", "gsm8k")
LETTERS = "ABCDEFGHIJ"


def add_chat_tokens(tokenizer):
    """Add the chat markers as special tokens (in place; a no-op when present); returns the tokenizer.

    New ids follow the existing ones, so the ids of every old token keep their meaning."""
    backend = tokenizer.backend
    missing = [t for t in CHAT_TOKENS if backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True) for t in missing])
        for cached in ("vocab_size", "sha256"):
            tokenizer.__dict__.pop(cached, None)
    return tokenizer


def chat_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.backend.token_to_id(t) for t in CHAT_TOKENS}
    if None in ids.values():
        raise DataError("the tokenizer has no chat tokens: call lrkv.data.chat.add_chat_tokens(tokenizer) first")
    return ids


# ------------------------------------------------------------------ adapters


def mmlu_messages(row: dict) -> list[dict]:
    """MMLU-style row (question, choices, answer index or letter) -> a user question, assistant letter."""
    if "question" not in row and isinstance(row.get("train"), dict):  # cais/mmlu auxiliary_train nests its rows
        row = row["train"]
    choices = list(row["choices"])
    answer = row["answer"]
    index = LETTERS.index(answer) if isinstance(answer, str) else int(answer)
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    question = f"{row['question']}\n\n{options}\n\nAnswer with the letter of the correct choice."
    return [{"role": "user", "content": question}, {"role": "assistant", "content": LETTERS[index]}]


def gsm8k_messages(row: dict) -> list[dict]:
    """GSM8K-style row (question, answer with worked solution) -> one user turn, one assistant turn."""
    return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]


def row_messages(row: dict, fmt: str = "chat") -> list[dict]:
    """The conversation of one row in the given format (``chat``: its ``messages`` column)."""
    if fmt == "chat":
        if "messages" not in row:
            raise DataError(
                f"chat row without a 'messages' column (columns: {', '.join(row)}): use data.format=chat "
                "with SmolTalk-style rows, or data.format=mmlu / gsm8k"
            )
        return list(row["messages"])
    if fmt == "mmlu":
        return mmlu_messages(row)
    if fmt == "gsm8k":
        return gsm8k_messages(row)
    raise ConfigError(f"data.format={fmt!r} is unknown: use text, {', '.join(FORMATS)}")


# ------------------------------------------------------------------ rendering


def render(messages: Sequence[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in the chat template, and the loss mask (1 = assistant target)."""
    special = chat_ids(tokenizer)
    messages = list(messages)
    if messages and messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise DataError("a system message must be followed by a user message")
        first = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [first, *messages[2:]]
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant") or not isinstance(content, str):
            raise DataError(f"message {i} has role {role!r}: expected user/assistant turns with string content")
        start, end = (USER_START, USER_END) if role == "user" else (ASSISTANT_START, ASSISTANT_END)
        body = tokenizer.encode(content)
        on = 1 if role == "assistant" else 0
        ids += [special[start], *body, special[end]]
        mask += [0, *([on] * len(body)), on]
    return ids, mask


def prompt_ids(prompt: str, tokenizer) -> list[int]:
    """A user prompt in the template, ready for the assistant's reply (generation)."""
    special = chat_ids(tokenizer)
    return [special[USER_START], *tokenizer.encode(prompt), special[USER_END], special[ASSISTANT_START]]


def masked_document(ids: Sequence[int], mask: Sequence[int]) -> np.ndarray:
    """One conversation as stored in the stream: non-target tokens as ``~id`` (negative)."""
    arr = np.asarray(ids, dtype=np.int64)
    return np.where(np.asarray(mask, dtype=bool), arr, ~arr)


# ------------------------------------------------------------------ reading conversations


def iter_rows(spec: CorpusSpec, split: str = "train") -> Iterator[dict]:
    """The rows of one split of a local jsonl/json/parquet source or a hub dataset, split like
    ``lrkv.data.corpus.iter_documents`` (val_split, val_documents, or val_fraction by a hash of the row)."""
    import datasets

    kind = source_kind(spec.source)
    if kind == "embedded":
        raise ConfigError("data.format=chat needs conversations: set data.source=CONVERSATIONS.jsonl or a hub name")
    explicit = spec.val_split is not None

    def load(where: str | None):
        if kind == "local":
            files = resolve_data_files(where or spec.source)
            ext = files[0].rsplit(".", 1)[-1]
            builder = {"jsonl": "json", "json": "json", "parquet": "parquet"}.get(ext)
            if builder is None:
                raise DataError(f"chat data must be .jsonl, .json or .parquet files, got {files[0]!r}")
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=spec.streaming)
        name = spec.source[3:] if spec.source.startswith("hf:") else spec.source
        return datasets.load_dataset(name, spec.name, split=where or spec.split, streaming=spec.streaming)

    rows: Iterable[dict] = load(spec.val_split if split == "val" and explicit else None)
    if spec.max_documents is not None:
        rows = (r for _, r in zip(range(spec.max_documents), rows))
    if spec.val_documents is not None:
        for i, row in enumerate(rows):
            if (i < spec.val_documents) == (split == "val"):
                yield row
        return
    for row in rows:
        if explicit or is_validation(
            json.dumps(row, sort_keys=True, default=str), spec.val_fraction, spec.split_seed
        ) == (split == "val"):
            yield row


def conversation_documents(
    rows: Iterable[dict], tokenizer, fmt: str = "chat", max_tokens: int | None = None
) -> list[np.ndarray]:
    """Rendered, masked conversations (see ``masked_document``), up to about ``max_tokens`` tokens."""
    docs, total = [], 0
    for row in rows:
        ids, mask = render(row_messages(row, fmt), tokenizer)
        docs.append(masked_document(ids, mask))
        total += len(ids) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    if not docs:
        raise DataError("no conversations in this split: add conversations or lower data.val_fraction")
    return docs


def chat_tokens(rows: Iterable[dict], tokenizer, *, fmt="chat", max_tokens=None, shuffle_documents=False, seed=0):
    """An ``InMemoryTokens`` of masked conversations (int32: signed, for the ~id marks); the end-of-text id
    after each conversation is not a target."""
    from lrkv.data.loader import InMemoryTokens

    docs = conversation_documents(rows, tokenizer, fmt, max_tokens)
    return InMemoryTokens(docs, ~tokenizer.eos_id, shuffle_documents=shuffle_documents, seed=seed, dtype=np.int32)
