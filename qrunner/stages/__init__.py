"""The stages; importing this package registers them."""
from qrunner.stages import capture, data, evaluate, export, load, quantize, tasks  # noqa: F401
