"""Calibration prompts for diffusion models: a built-in list bundled with qrunner, or a local file.

`builtin` is `assets/prompts.txt`: 64 caption-like prompts written for this project (scenes, objects, styles),
one a line. A local source may be:

- `.txt`: one prompt a line (blank lines skipped);
- `.jsonl`: one record a line, the prompt in the field `text_field` (or, when that field is absent from every
  record, the first of `prompt`, `caption`, `text` the records have);
- `.tsv`: a header row naming the columns, the prompt in the column `text_field` (or `caption`, `prompt`, `text`;
  a TSV of COCO-style `id<TAB>caption` rows works as it is).

`choose_prompts` draws `nsamples` of them with a fixed seed, without repeats.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Tuple

import torch

from qrunner._paths import asset
from qrunner.errors import UserError

BUILTIN_PROMPTS = "prompts.txt"
PROMPT_FIELDS = ("prompt", "caption", "text")
FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".tsv": "tsv"}


def _pick_field(fields: List[str], text_field: str, where: str, key: str) -> str:
    for name in (text_field, *PROMPT_FIELDS):
        if name in fields:
            return name
    raise UserError(f"{key}: {where} has no {text_field!r} field (nor {', '.join(PROMPT_FIELDS)}); it has "
                    f"{', '.join(fields) or 'none'}. Set data.text_field to the field holding the prompts.")


def read_prompts(source: str, text_field: str = "text", key: str = "data.source") -> Tuple[List[str], str]:
    """Every prompt of `source` ("builtin" or a local .txt/.jsonl/.tsv), and where they came from."""
    path = asset(BUILTIN_PROMPTS) if source == "builtin" else Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{key}={source!r}: no such file. Give a local .txt (one prompt a line), .jsonl or .tsv "
                        "file, or builtin for the bundled prompts.")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{key}={source!r}: unknown prompt file type {path.suffix!r}; use .txt (one prompt a "
                        "line), .jsonl or .tsv.")
    try:
        if kind == "txt":
            prompts = path.read_text(encoding="utf-8").splitlines()
        elif kind == "jsonl":
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not all(isinstance(r, dict) for r in records):
                raise UserError(f"{key}={source!r}: every line must be a JSON object")
            fields = sorted({k for r in records for k in r})
            name = _pick_field(fields, text_field, str(path), key)
            prompts = [str(r.get(name, "")) for r in records]
        else:
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f, delimiter="\t"))
            if not rows:
                raise UserError(f"{key}={source!r} is empty")
            column = rows[0].index(_pick_field(rows[0], text_field, f"{path} (header row)", key))
            prompts = [row[column] for row in rows[1:] if len(row) > column]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{key}={source!r}: could not read it as {kind}: {err}") from None
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise UserError(f"{key}={source!r} holds no prompts")
    return prompts, f"{source} ({kind}, {len(prompts)} prompts)"


def choose_prompts(prompts: List[str], nsamples: int, seed: int, key: str = "data.nsamples") -> List[str]:
    """`nsamples` distinct prompts drawn with `seed` (the same ones on every run and machine)."""
    if nsamples < 1:
        raise UserError(f"{key}={nsamples}: at least one prompt is needed")
    if nsamples > len(prompts):
        raise UserError(f"{key}={nsamples} but the prompt source holds {len(prompts)} prompts; lower {key} or "
                        "give a longer prompt file (data.source).")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(int(seed)))
    return [prompts[i] for i in order[:nsamples].tolist()]
