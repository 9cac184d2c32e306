"""Which file (or the command line) set a config key: named in validation errors."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional

import yaml

from qrunner._paths import conf_dir

# merge order of the primary config's defaults list: later entries win
GROUP_ORDER = ("family", "scheme", "memory", "data", "eval", "export")


def _sets_key(data: object, dotted: str) -> bool:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _load_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


class Provenance:
    """Answers "where did this key's value come from" for one composed config."""

    def __init__(self, choices: Dict[str, Optional[str]], overrides: Iterable[str], recipe_dirs: List[Path]):
        self.choices = choices
        self.overrides = list(overrides)
        self.recipe_dirs = recipe_dirs

    def source_of(self, key: str) -> str:
        for override in reversed(self.overrides):
            name = override.split("=", 1)[0].lstrip("+~")
            if name == key or key.startswith(name + "."):
                return f"the command line ({override})"
        recipe = self.choices.get("recipe")
        if recipe:
            for folder in self.recipe_dirs:
                file = folder / f"{recipe}.yaml"
                if file.is_file():
                    if _sets_key(_load_yaml(file), key):
                        return f"recipe '{recipe}' ({file})"
                    break
        group = key.split(".", 1)[0]
        option = self.choices.get(group)
        if group in GROUP_ORDER and option:
            file = conf_dir() / group / f"{option}.yaml"
            if _sets_key({group: _load_yaml(file)}, key):
                return f"{group}/{option} ({file})"
        return "qrunner's defaults (qrunner/config/schema.py)"
