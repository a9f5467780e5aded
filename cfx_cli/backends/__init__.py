"""Forward-only backends for the diffusion networks (UNet/VAE): eager torch, ONNX Runtime, TensorRT (through
ONNX Runtime's TensorRT execution provider; unverified, see docs/backends.md).

Gradient paths always stay in torch: a backend is only ever used for calls under ``torch.no_grad()``.
Every accelerated build is compared with torch on random inputs before use (:mod:`cfx_cli.backends.parity`);
a build that fails the gate, or a backend whose library/hardware is missing, is refused with a one-line notice
and the caller gets the torch backend instead. Importing this package does not import torch.
"""

from cfx_cli.backends.base import BACKENDS, BackendError, ForwardBackend, ParityError, TorchBackend
from cfx_cli.backends.select import build_backend, forward_backend

__all__ = ["BACKENDS", "BackendError", "ForwardBackend", "ParityError", "TorchBackend", "build_backend",
           "forward_backend"]
