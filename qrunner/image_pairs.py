"""Image–text calibration pairs from a local folder or JSONL file (`data.images`).

- A folder: every image file in it (sorted by name); an image's prompt is the text of the `.txt` file with the
  same stem next to it, or `data.image_prompt` when there is none.
- A `.jsonl` file: one object per line with the image path (`image`, relative to the file or absolute) and
  optionally its prompt (`data.text_field`, default `text`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List

from qrunner.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_FIELD = "image"


@dataclass(frozen=True)
class ImageTextPair:
    image: Path
    prompt: str


def read_image_pairs(source: str, default_prompt: str, text_field: str = "text") -> List[ImageTextPair]:
    """The pairs `source` names, in a stable order; a UserError naming the problem and the fix otherwise."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data.images={source!r} does not exist; give a folder of images (prompts in same-named "
                        f".txt files) or a .jsonl file of {{\"{IMAGE_FIELD}\": path, \"{text_field}\": prompt}} lines.")
    if path.is_dir():
        pairs = [ImageTextPair(p, _prompt_beside(p, default_prompt)) for p in sorted(path.iterdir())
                 if p.suffix.lower() in IMAGE_SUFFIXES]
        where = f"folder {path}"
    elif path.suffix.lower() in (".jsonl", ".json"):
        pairs = _jsonl_pairs(path, default_prompt, text_field)
        where = f"file {path}"
    else:
        raise UserError(f"data.images={source!r} is neither a folder nor a .jsonl file.")
    if not pairs:
        raise UserError(f"data.images: the {where} holds no image ({', '.join(IMAGE_SUFFIXES)}).")
    return pairs


def _prompt_beside(image: Path, default_prompt: str) -> str:
    text = image.with_suffix(".txt")
    return text.read_text(encoding="utf-8").strip() if text.is_file() else default_prompt


def _jsonl_pairs(path: Path, default_prompt: str, text_field: str) -> List[ImageTextPair]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"data.images: line {number} of {path} is not JSON ({e.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get(IMAGE_FIELD), str):
            raise UserError(f"data.images: line {number} of {path} has no \"{IMAGE_FIELD}\" path.")
        image = Path(record[IMAGE_FIELD]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise UserError(f"data.images: line {number} of {path} names {image}, which does not exist.")
        prompt = record.get(text_field)
        pairs.append(ImageTextPair(image, prompt if isinstance(prompt, str) and prompt.strip() else default_prompt))
    return pairs


def open_image(pair: ImageTextPair) -> Any:
    """The image as an RGB PIL image; a UserError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(pair.image) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"data.images: cannot read the image {pair.image} ({e}); remove or replace it.") from None
