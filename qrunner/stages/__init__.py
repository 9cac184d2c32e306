"""The stages; importing this package registers them."""
from qrunner.stages import (autoscheme, autoscheme_scores, capture, data, diffusion_capture, diffusion_data,  # noqa: F401
                            diffusion_evaluate, diffusion_export, evaluate, export, export_formats, export_gguf, load, quantize,
                            tasks)
