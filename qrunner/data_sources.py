"""Read documents from the bundled corpus or a local file/folder, and cut token windows from them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Tuple

import torch

from qrunner._paths import asset
from qrunner.errors import UserError

BUILTIN = {"calibration": "corpus/calibration.txt", "evaluation": "corpus/heldout.txt"}


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf_disk"
    return {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(
        path.suffix.lower(), "text")


def _split_paragraphs(text: str) -> List[str]:
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def read_documents(source: str, fmt: str, text_field: str, purpose: str, split_paragraphs: bool = False
                   ) -> Tuple[List[str], str]:
    """Documents as strings, and a description of where they came from.

    A text file (the bundled corpora too) is one document, its text as it is, unless `split_paragraphs`
    splits it at blank lines; JSONL, parquet and datasets folders give one document per record, read from
    the `text_field` column.
    """
    fmt = fmt.value if hasattr(fmt, "value") else str(fmt)
    path = asset(BUILTIN[purpose]) if source == "builtin" else Path(source).expanduser()
    kind = _format_of(path, fmt)
    key = "data.source" if purpose == "calibration" else "eval.source"
    try:
        if kind == "text":
            text = path.read_text(encoding="utf-8")
            docs = _split_paragraphs(text) if split_paragraphs else [text]
        elif kind == "jsonl":
            docs = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        docs.append(_field(json.loads(line), text_field, f"{path}:{n}", key))
        elif kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise UserError(f"{key}: column {text_field!r} not in {path}; columns: "
                                f"{', '.join(table.column_names)}. Set {key.split('.')[0]}.text_field.")
            docs = [str(t) for t in table.column(text_field).to_pylist() if t]
        elif kind == "hf_disk":
            from datasets import DatasetDict, load_from_disk

            ds: Any = load_from_disk(str(path))
            if isinstance(ds, DatasetDict):
                ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
            if text_field not in ds.column_names:
                raise UserError(f"{key}: column {text_field!r} not in {path}; columns: "
                                f"{', '.join(ds.column_names)}. Set {key.split('.')[0]}.text_field.")
            docs = [str(t) for t in ds[text_field] if t]
        else:
            raise UserError(f"{key}: unknown format {kind!r}; use text, jsonl, parquet or hf_disk")
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise UserError(f"{key}={source!r}: could not read it as {kind}: {err}") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{key}={source!r} holds no text")
    return docs, f"{source} ({kind}, {len(docs)} documents)"


def _field(record: Any, text_field: str, where: str, key: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{key}: record at {where} has no field {text_field!r}; set the text_field option")
    return str(record[text_field])


def tokenize_documents(tokenizer: Any, docs: List[str]) -> List[List[int]]:
    """Each document's tokens on its own (no special tokens)."""
    return tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]


EOS = "eos"  # the separator value that puts the tokenizer's end-of-text token between documents


def token_stream(tokenizer: Any, docs: List[str], separator: str, key: str) -> List[int]:
    """All documents as one token stream, the standard way perplexity is measured (GPTQ, transformers'
    perplexity guide): the texts joined with `separator` and tokenized once, with the special tokens the
    tokenizer adds by itself (a BOS at the start of the stream for Llama-style tokenizers, nothing for others).
    `separator="eos"` instead tokenizes each document on its own and puts the end-of-text token between them
    (for a corpus of unrelated documents, as models are pretrained on them)."""
    if separator == EOS:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise UserError(f"{key}=eos: the tokenizer has no end-of-text token; use a text separator "
                            "such as the default blank line")
        stream: List[int] = []
        for ids in tokenize_documents(tokenizer, docs):
            stream.extend(ids)
            stream.append(eos)
        return stream
    return tokenizer(separator.join(docs), verbose=False)["input_ids"]


def stream_windows(stream: List[int], seqlen: int) -> torch.Tensor:
    """The stream cut into non-overlapping windows of seqlen tokens (a shorter tail is left out)."""
    n = len(stream) // seqlen
    return torch.tensor(stream[: n * seqlen], dtype=torch.long).view(n, seqlen)


def text_windows(tokenizer: Any, section: Any, purpose: str) -> Tuple[torch.Tensor, int, str]:
    """Non-overlapping `seqlen` windows of the configured text (`section` is cfg.data or cfg.eval), the number
    of documents read, and where they came from."""
    key = "data" if purpose == "calibration" else "eval"
    docs, origin = read_documents(section.source, section.format, section.text_field, purpose,
                                  bool(section.split_paragraphs))
    stream = token_stream(tokenizer, docs, str(section.separator), f"{key}.separator")
    return stream_windows(stream, int(section.seqlen)), len(docs), origin


def long_document_windows(token_docs: List[List[int]], seqlen: int, generator: torch.Generator
                          ) -> Tuple[torch.Tensor, int]:
    """One random window from each document of at least seqlen tokens; returns (windows, dropped count)."""
    windows, dropped = [], 0
    for ids in token_docs:
        if len(ids) < seqlen:
            dropped += 1
            continue
        start = int(torch.randint(0, len(ids) - seqlen + 1, (1,), generator=generator))
        windows.append(ids[start:start + seqlen])
    if not windows:
        return torch.empty(0, seqlen, dtype=torch.long), dropped
    return torch.tensor(windows, dtype=torch.long), dropped
