"""The stages; importing this package registers them."""
from qrunner.stages import (autoscheme, autoscheme_scores, capture, data, evaluate, export, load, quantize,  # noqa: F401
                            tasks)
