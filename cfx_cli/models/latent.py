"""``LatentModel``: the one latent text-to-image model (TIME, ECED, the demo's sampler): Stable Diffusion 1.x/2.x
components (VAE, UNet, CLIP text encoder and tokenizer, scheduler) loaded from a diffusers folder or the demo.

Conventions, defined here once: images are (N, 3, R, R) in [0, 1] (the VAE's [-1, 1] stays inside), latents are
scaled by the VAE's ``scaling_factor``, prompts longer than the tokenizer's length are an error (never silently
truncated), and :meth:`LatentModel.unet_eps` returns ε whatever the UNet predicts (ε, v or x₀).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from cfx_cli.backends.latent import latent_forward
from cfx_cli.errors import UsageError
from cfx_cli.models.folders import SD_COMPONENTS, missing_files, read_json
from cfx_cli.models.memory import MemoryOptions, apply_to_diffusers, apply_to_text_encoder, resolve_dtype
from cfx_cli.params import Param
from cfx_cli.quiet import quiet_loaded_libraries

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: the working resolution of the latent methods (TIME, ECED): declared by each, applied by ``models.model_for``
RESOLUTION_PARAM = Param("resolution", "int", 0, "image side the VAE/UNet work at (inputs are resized and "
                         "centre-cropped to it); 0 = the model's own (SD 1.x: 512)", min=0)


@dataclass(eq=False)
class LatentModel:
    """Frozen Stable-Diffusion-style components and what the methods need to know about them (kind "latent")."""

    vae: Any = None  # diffusers.AutoencoderKL
    unet: Any = None  # diffusers.UNet2DConditionModel
    text_encoder: Any = None  # transformers.CLIPTextModel
    tokenizer: Any = None  # transformers.CLIPTokenizer
    scheduler: Any = None  # the diffusers scheduler of scheduler_config.json (its betas and conventions)
    device: str = "cpu"
    dtype: Any = None
    source: str = ""
    info: dict = field(default_factory=dict)
    spec: str = ""  # the --model spec it was loaded from (recorded by TIME's tokens and ECED's records)
    #: forward-only calls on the ``--backend`` (``cfx_cli.backends.latent.LatentForward``); None = the modules
    forward: Any = None
    #: the image side the methods work at when not the native one (``--set resolution=``); 0 = native
    working_resolution: int = 0

    kind = "latent"

    # -- the schedule ----------------------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return prediction_type(self.scheduler, self.spec or self.source)

    @cached_property
    def alphas_cumprod(self):
        """ᾱ of the training schedule, (T_train,) float32 on the CPU."""
        return self.scheduler.alphas_cumprod.detach().float().cpu()

    @cached_property
    def final_alpha_cumprod(self) -> float:
        """ᾱ after the last DDIM step (the scheduler's own; for DDPM configs SD 1.x's set_alpha_to_one rule)."""
        if hasattr(self.scheduler, "final_alpha_cumprod"):  # DDIM schedulers
            return float(self.scheduler.final_alpha_cumprod)
        return 1.0 if self.scheduler.config.get("set_alpha_to_one", False) else float(self.alphas_cumprod[0])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def steps_offset(self) -> int:
        return int(self.scheduler.config.get("steps_offset", 0))

    # -- sizes -----------------------------------------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def vae_factor(self) -> int:
        """How much the VAE downsamples (2 per encoder block after the first; SD: 8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The image side the model was made for: the UNet's sample size × the VAE's downsampling (SD 1.x: 512;
        the VAE's own ``sample_size`` agrees in the published folders)."""
        sample = self.unet.config.sample_size
        return int(sample if isinstance(sample, int) else sample[0]) * self.vae_factor

    @property
    def resolution(self) -> int:
        """Image side the methods work at: ``--set resolution=`` (:meth:`with_resolution`), else the native one."""
        return self.working_resolution or self.native_resolution

    @property
    def latent_side(self) -> int:
        return self.resolution // self.vae_factor

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the images the VAE encodes and decodes here (an explainer's working size)."""
        return (self.resolution, self.resolution)

    def with_resolution(self, side: int, method: str = "this method") -> LatentModel:
        """The same components working at ``side`` × ``side`` (``--set resolution=``; 0 = native): a copy, so a
        cached model keeps its own. ``side`` must be a multiple of the VAE's × the UNet's downsampling."""
        if not side or side == self.resolution:
            return self
        step = self.vae_factor * 2 ** (len(self.unet.config.down_block_types) - 1)
        if side % step:
            raise UsageError(f"{method}: --set resolution={side}: must be a multiple of {step} for "
                             f"{self.spec or self.source} (its VAE downsamples ×{self.vae_factor}, its UNet "
                             f"×{step // self.vae_factor} more)")
        return replace(self, working_resolution=int(side), forward=None)

    @property
    def embedding_dim(self) -> int:
        return int(self.text_encoder.get_input_embeddings().weight.shape[1])

    # -- calls -----------------------------------------------------------------------------------------------
    def use_backend(self, context) -> str:
        """Route the forward-only calls (UNet, VAE encode/decode) through ``context``'s backend choice; returns
        the backend's description for the run record."""
        side = self.latent_side
        channels = int(self.unet.config.in_channels)
        seq = int(self.tokenizer.model_max_length)
        fwd = latent_forward(context, self.unet, self.vae, (channels, side, side), (seq, self.embedding_dim),
                             label=self.spec)
        self.forward = None if fwd.direct else fwd
        return fwd.describe()

    def unet_eps(self, z, t, embeds):
        """ε in float32 at diffusers timestep(s) ``t`` (an int, or a (N,) tensor), for any prediction type."""
        import torch

        if isinstance(t, int):
            t = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        if self.forward is not None and not torch.is_grad_enabled():  # gradients (token fitting) stay in torch
            out = self.forward.unet(z.float(), t.float(), embeds.float()).float()
        else:
            out = self.unet(z.to(self.dtype), t, encoder_hidden_states=embeds.to(self.dtype)).sample.float()
        return self.eps_from_output(out, z, t)

    def eps_from_output(self, out, z, t):
        """The UNet output at timesteps ``t`` as ε: unchanged for ε-prediction, converted for v (SD 2.x 768-v)
        and x₀ ("sample") with the schedule's ᾱ_t (cfx_cli.diffusion.eps_from_output)."""
        pred = self.prediction_type
        if pred == "epsilon":
            return out
        from cfx_cli.diffusion import broadcast, eps_from_output

        ab = self.scheduler.alphas_cumprod.double()
        x = z.float()
        return eps_from_output(out, x, broadcast(ab.sqrt(), t, x), broadcast((1 - ab).sqrt(), t, x), pred)

    def encode_images(self, images, *, sample: bool = False, generator=None):
        """Images (N, 3, R, R) in [0, 1] → latents × scaling (posterior mean, or a sample), float32."""
        import torch

        if self.forward is not None and not sample and not torch.is_grad_enabled():
            return self.forward.encode((images * 2 - 1).to(self.device).float()).float() * self.scaling_factor
        dist = self.latent_dist(images)
        z = dist.sample(generator=generator) if sample else dist.mean
        return z.float() * self.scaling_factor

    def latent_dist(self, images):
        """The VAE posterior (diffusers ``DiagonalGaussianDistribution``: ``mean``, ``std``, unscaled) of images
        (N, 3, R, R) in [0, 1]."""
        return self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist

    def decode_latents(self, z):
        """Latents × scaling → images in [0, 1], float32."""
        import torch

        if self.forward is not None and not torch.is_grad_enabled():
            img = self.forward.decode((z / self.scaling_factor).float()).float()
        else:
            img = self.vae.decode((z / self.scaling_factor).to(self.vae.dtype)).sample.float()
        return (img.clamp(-1, 1) + 1) / 2

    def encode_prompts(self, prompts: list[str]):
        """Prompts padded to the tokenizer's length → the text encoder's last hidden states (N, L, D)."""
        return self.text_encoder(self.tokenize(prompts))[0]

    def tokenize(self, prompts: list[str]):
        """Token ids (N, L) on the model's device; a prompt longer than L tokens is a usage error."""
        import torch

        tok = self.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=False).input_ids
        for prompt, row in zip(prompts, ids, strict=True):
            if len(row) > tok.model_max_length:
                raise UsageError(f"a prompt ({prompt!r}) is {len(row)} tokens, longer than the text encoder's "
                                 f"{tok.model_max_length}; use a shorter prompt template")
        return torch.tensor(ids, dtype=torch.long).to(self.device)


def prediction_type(scheduler, label: str) -> str:
    """What the UNet predicts, from the scheduler config: epsilon, v_prediction or sample (x₀)."""
    pred = str(scheduler.config.get("prediction_type", "epsilon"))
    if pred not in PREDICTION_TYPES:
        raise UsageError(f"{label}: scheduler prediction_type {pred!r} is not supported "
                         f"({', '.join(PREDICTION_TYPES)})")
    return pred


def load_latent(
    folder: Path,
    device: str = "cpu",
    memory: MemoryOptions | None = None,
    components: tuple[str, ...] = SD_COMPONENTS,
    source: str = "",
) -> LatentModel:
    """Load Stable Diffusion 1.x/2.x components from a folder laid out as diffusers saves pipelines."""
    memory = memory or MemoryOptions()
    label = f"diffusers:{source or folder}"
    missing = missing_files(folder, components)
    if missing:
        raise UsageError(f"{label}: missing {', '.join(missing)} (in {folder})")
    quiet_libraries()
    dtype = resolve_dtype(device, memory.precision, label)
    model = LatentModel(device=device, dtype=dtype, source=source or str(folder))
    try:
        if "vae" in components:
            from diffusers import AutoencoderKL

            model.vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=dtype)
        if "unet" in components:
            from diffusers import UNet2DConditionModel

            model.unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=dtype)
        if "text_encoder" in components:
            from transformers import CLIPTextModel

            model.text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=dtype)
        if "tokenizer" in components:
            from transformers import CLIPTokenizer

            model.tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        if "scheduler" in components:
            model.scheduler = load_scheduler(folder / "scheduler")
    except UsageError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{label}: cannot load ({type(exc).__name__}: {first})") from None
    for name in ("vae", "unet", "text_encoder"):
        mod = getattr(model, name)
        if mod is not None:
            mod.to(device).eval().requires_grad_(False)
            (apply_to_text_encoder if name == "text_encoder" else apply_to_diffusers)(mod, memory)
    if model.scheduler is not None:
        prediction_type(model.scheduler, label)  # an unsupported one fails at load, naming the folder
    model.info = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("vae", "unet", "text_encoder")
        if getattr(model, name) is not None
    }
    return model


def load_scheduler(folder: Path):
    """The scheduler class named in ``scheduler_config.json`` (falling back to DDIM for unknown ones)."""
    import diffusers

    cfg = read_json(folder / "scheduler_config.json")
    cls = getattr(diffusers, str(cfg.get("_class_name", "DDIMScheduler")), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = diffusers.DDIMScheduler
    return cls.from_pretrained(str(folder))


def quiet_libraries() -> None:
    """diffusers/transformers print loading bars and accelerate hints; cfx reports its own progress."""
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    quiet_loaded_libraries()  # CFX_DEBUG=1 keeps their output
