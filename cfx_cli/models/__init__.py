"""The model layer: one ``PixelModel``, one ``LatentModel``, one ``BridgeModel``, and the one loader behind
``--model SPEC`` (demo, diffusers, ADM, I2SB; :func:`model_for` caches it per process), memory options, token
embeddings for textual inversion, and the ``cfx models`` catalogue. Importing this package does not import
torch; each loader imports its framework when called."""

from cfx_cli.models.bridge import BridgeModel
from cfx_cli.models.catalog import DEFAULT_MODELS
from cfx_cli.models.demo import demo_models
from cfx_cli.models.latent import LatentModel
from cfx_cli.models.memory import MemoryOptions
from cfx_cli.models.pixel import PixelModel
from cfx_cli.models.spec import clear_model_cache, load_model, model_for, parse_model_spec, pixel_prior

__all__ = [
    "DEFAULT_MODELS",
    "BridgeModel",
    "LatentModel",
    "MemoryOptions",
    "PixelModel",
    "clear_model_cache",
    "demo_models",
    "load_model",
    "model_for",
    "parse_model_spec",
    "pixel_prior",
]
