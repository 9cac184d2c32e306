"""Hydra plugins that expose qrunner's top-level `recipes/` folder as the config group `recipe`.

Hydra maps a config group to a folder of the same name inside a search-path entry. Recipes live in
their own top-level folder (and users keep theirs in `./recipes`), so a small config source serves
the files of such a folder as the group `recipe`, with `_global_` as the default package: a recipe
sets keys anywhere in the config and may override other groups in its defaults list.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin

GROUP = "recipe"
SCHEME = "qrunner-recipes"


class RecipeConfigSource(ConfigSource):
    """Serves `<dir>/NAME.yaml` as the config `recipe/NAME`."""

    def __init__(self, provider: str, path: str) -> None:
        if "://" not in path:
            path = f"{self.scheme()}://{path}"
        super().__init__(provider=provider, path=path)

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _file(self, config_path: str) -> Optional[Path]:
        config_path = self._normalize_file_name(config_path)
        group, _, name = config_path.partition("/")
        if group != GROUP or not name or "/" in name:
            return None
        return Path(self.path) / name

    def load_config(self, config_path: str) -> ConfigResult:
        file = self._file(config_path)
        if file is None or not file.is_file():
            raise ConfigLoadError(f"Recipe not found: {config_path}")
        text = file.read_text(encoding="utf-8")
        header = ConfigSource._get_header_dict(text[:512])
        if not header.get("package"):
            header["package"] = "_global_"
        return ConfigResult(
            config=OmegaConf.create(OmegaConf.load(file)),
            path=f"{self.scheme()}://{self.path}",
            provider=self.provider,
            header=header,
        )

    def available(self) -> bool:
        return os.path.isdir(self.path)

    def is_group(self, config_path: str) -> bool:
        return config_path in ("", GROUP) and self.available()

    def is_config(self, config_path: str) -> bool:
        file = self._file(config_path)
        return file is not None and file.is_file()

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        if not self.available():
            return []
        files: List[str] = []
        if config_path == "":
            if results_filter in (None, ObjectType.GROUP):
                files.append(GROUP)
            return files
        if config_path != GROUP:
            return files
        for entry in sorted(os.listdir(self.path)):
            if entry.endswith(".yaml") and os.path.isfile(os.path.join(self.path, entry)):
                self._list_add_result(
                    files=files,
                    file_path=f"{GROUP}/{entry}",
                    file_name=entry,
                    results_filter=results_filter,
                )
        return sorted(set(files))


class RecipeSearchPath(SearchPathPlugin):
    """Adds `./recipes` (the user's, first) and qrunner's bundled recipes to the search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        try:
            from qrunner._paths import recipes_dir
        except ImportError:  # another program using Hydra without qrunner importable
            return
        bundled = recipes_dir()
        local = Path.cwd() / "recipes"
        if local.is_dir() and local.resolve() != bundled.resolve():
            search_path.append(provider="qrunner-local-recipes", path=f"{SCHEME}://{local.resolve()}")
        search_path.append(provider="qrunner-recipes", path=f"{SCHEME}://{bundled}")
