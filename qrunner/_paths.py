"""Where qrunner's bundled files live, in a source checkout and in an installed wheel."""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _bundled(name: str) -> Path:
    """`conf/` and `recipes/` sit at the repo root in a checkout and inside the package in a wheel."""
    inside = PACKAGE_DIR / name
    if inside.is_dir():
        return inside
    return PACKAGE_DIR.parent / name


def conf_dir() -> Path:
    return _bundled("conf")


def recipes_dir() -> Path:
    return _bundled("recipes")


def assets_dir() -> Path:
    return PACKAGE_DIR / "assets"


def asset(name: str) -> Path:
    path = assets_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"qrunner asset {name!r} not found under {assets_dir()}")
    return path
