"""Backends for the pixel diffusion models of the model layer (``PixelModel``: ADM or diffusers): the
network as a tensor-in/tensor-out module, and a drop-in ``model(x, t)`` that runs it on a gated backend."""

from __future__ import annotations

from typing import Any

from cfx_cli.backends.base import ForwardBackend
from cfx_cli.backends.select import forward_backend
from cfx_cli.models.pixel import require_size


def network_output(net: Any, x, t):
    """``net(x, t)`` as a tensor: an ADM network's output, or a diffusers ``UNet2DModel``'s ``.sample``."""
    out = net(x, t)
    return getattr(out, "sample", out)


def net_module(model: Any):
    """``model.net`` as an ``nn.Module`` mapping (x, timesteps) to the output tensor (diffusers' ``.sample``)."""
    import torch

    class PixelNet(torch.nn.Module):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return network_output(self.net, x, t)

    return PixelNet(model.net)


class BackendPixelModel:
    """Calls like the wrapped pixel model (``model(x, t)`` with schedule indices); unconditional calls go through
    the backend, class-conditional ones (``y``) through the model itself."""

    def __init__(self, model: Any, backend: ForwardBackend) -> None:
        self.model = model
        self.backend = backend
        self.diffusion = model.diffusion
        # plain fp32 torch is the model's own call: bit-identical to not having a backend at all
        self.direct = backend.plain

    def __call__(self, x, t, y=None):
        if y is not None or self.direct:
            return self.model(x, t, y)
        ts = self.diffusion.model_timesteps(t, batch=x.shape[0]).to(x.device)
        if ts.numel() == 1 and x.shape[0] > 1:
            ts = ts.expand(x.shape[0])
        dtype = getattr(self.model, "dtype", None) or x.dtype
        return self.backend(x.to(dtype), ts).float()


_NETS: dict[int, Any] = {}


def pixel_forward(context: Any, model: Any, sample_shape: tuple[int, ...]) -> BackendPixelModel:
    """A forward-only stand-in for the pixel ``model`` at images of ``sample_shape`` (C, H, W), on the backend
    chosen by ``--backend`` (see :func:`cfx_cli.backends.forward_backend`)."""
    import torch

    require_size(sample_shape, model.size, getattr(model, "spec", "") or getattr(model, "source", "model"))
    key = id(model.net)
    if key not in _NETS:
        _NETS[key] = net_module(model).eval()
    net = _NETS[key]
    dtype = getattr(model, "dtype", None) or torch.float32
    device = getattr(context, "device", "cpu")
    example = (torch.zeros((1, *sample_shape), dtype=dtype, device=device),
               torch.zeros((1,), dtype=torch.float32, device=device))
    return BackendPixelModel(model, forward_backend(context, net, example, label=getattr(model, "source", "model")
                                                    or "model"))
