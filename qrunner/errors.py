"""Errors caused by the user's input: printed as one clear message, without a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config value, missing model files, ...). The message says how."""


class ConfigValueError(UserError):
    def __init__(self, key: str, value: object, allowed: str, source: str, hint: str = "") -> None:
        value = getattr(value, "value", value)  # enums print as their value
        msg = f"config error: {key}={value!r} is not allowed (set in {source}); allowed: {allowed}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)
        self.key = key
