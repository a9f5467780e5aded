"""ADM / guided-diffusion pixel models: flags, the UNet, and a loader for ``.pt``/safetensors checkpoints."""

from cfx_cli.models.adm.flags import ADMFlags, load_flags, parse_flag_string
from cfx_cli.models.adm.loader import build_unet, load_adm

__all__ = ["ADMFlags", "build_unet", "load_adm", "load_flags", "parse_flag_string"]
