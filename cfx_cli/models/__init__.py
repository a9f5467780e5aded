"""The model layer: loaders behind ``--model SPEC`` (demo, diffusers, ADM, I2SB), memory options, token
embeddings for textual inversion, and the ``cfx models`` catalogue. Importing this package does not import
torch; each loader imports its framework when called."""

from cfx_cli.models.memory import MemoryOptions
from cfx_cli.models.spec import clear_model_cache, demo_models, load_model, model_for, parse_model_spec

__all__ = ["MemoryOptions", "clear_model_cache", "demo_models", "load_model", "model_for", "parse_model_spec"]
