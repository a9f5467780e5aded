"""``BridgeModel``: the one image-to-image Schrödinger bridge (RCSB): an I2SB checkpoint's ADM network
(``i2sb:``) or the demo's diffusers ``UNet2DModel`` (``demo:bridge``), with its bridge schedule. Images in [-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cfx_cli.models.pixel import require_size


@dataclass
class BridgeModel:
    """Calling it gives the network output (x_t - x_0)/σ_t at bridge step(s) ``step``; ``pred_x0`` the x̂_0
    estimate. ``flags`` is set for ADM networks (tensor output); without it ``net`` is a diffusers
    ``UNet2DModel`` (``.sample`` output)."""

    net: Any
    bridge: Any  # cfx_cli.diffusion.BridgeSchedule
    options: dict  # interval, beta_max, t0, T, cond_x1, ot_ode, corrupt, image_size (I2SB's run options)
    flags: Any = None  # cfx_cli.models.adm.ADMFlags for ADM networks
    device: str = "cpu"
    dtype: Any = None
    source: str = ""
    info: dict = field(default_factory=dict)
    spec: str = ""  # the --model spec it was loaded from

    kind = "bridge"

    @property
    def image_size(self) -> int:
        return self.flags.image_size if self.flags is not None else int(self.options["image_size"])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the images the bridge works on (RCSB's working size)."""
        return (self.image_size, self.image_size)

    @property
    def cond_x1(self) -> bool:
        return bool(self.options.get("cond_x1"))

    def __call__(self, x_t, step, cond=None):
        """Network output at bridge step(s) ``step`` (int or (N,)), i.e. the predicted (x_t - x_0)/σ_t. A float64
        state (RCSB's) is given to the network as a float32 copy, as the authors' code does."""
        import torch

        require_size(x_t, self.size, self.spec or self.source)
        if x_t.dtype == torch.float64:
            x_t = x_t.float()
            cond = cond.float() if cond is not None else None
        if self.cond_x1:
            if cond is None:
                raise ValueError("this bridge is conditioned on x_1: pass cond")
            x_in = torch.cat([x_t, cond], dim=1)
        else:
            x_in = x_t
        t = self.bridge.network_time(step, batch=x_t.shape[0]).to(x_t.device)
        if t.numel() == 1 and x_t.shape[0] > 1:
            t = t.expand(x_t.shape[0])
        out = self.net(x_in, t)
        return (out if self.flags is not None else out.sample).float()

    def pred_x0(self, x_t, step, cond=None, clip_denoise: bool = False):
        return self.bridge.pred_x0(step, x_t, self(x_t, step, cond), clip_denoise)
