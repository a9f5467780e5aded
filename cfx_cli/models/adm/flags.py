"""ADM MODEL_FLAGS / DIFFUSION_FLAGS: parse the original flag string or a config file into typed options.

Defaults are guided-diffusion's ``model_and_diffusion_defaults()``; flags that only steer training or sampling
scripts (``--batch_size``, ``--num_samples`` ...) are accepted and ignored, anything else unknown is an error.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cfx_cli.errors import UsageError

# Flags of guided-diffusion's scripts that do not change the network or the noise schedule.
IGNORED_FLAGS = frozenset(
    {
        "batch_size",
        "num_samples",
        "use_ddim",
        "clip_denoised",
        "model_path",
        "classifier_path",
        "classifier_scale",
        "lr",
        "weight_decay",
        "lr_anneal_steps",
        "microbatch",
        "ema_rate",
        "log_interval",
        "save_interval",
        "resume_checkpoint",
        "fp16_scale_growth",
        "data_dir",
        "schedule_sampler",
        "output_path",
        "gpus",
        "seed",
    }
)


@dataclass
class ADMFlags:
    # network (guided-diffusion model_and_diffusion_defaults)
    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 4
    num_heads_upsample: int = -1
    num_head_channels: int = -1
    attention_resolutions: str = "16,8"
    channel_mult: str = ""
    dropout: float = 0.0
    class_cond: bool = False
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_fp16: bool = False
    use_new_attention_order: bool = False
    in_channels: int = 3  # not a guided-diffusion flag; I2SB's conditional bridge uses 6
    num_classes: int = 1000
    # diffusion
    learn_sigma: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    timestep_respacing: str = ""
    use_kl: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = False
    rescale_learned_sigmas: bool = False

    def channel_mult_tuple(self) -> tuple[float, ...]:
        if self.channel_mult:
            return tuple(float(c) if "." in c else int(c) for c in self.channel_mult.split(","))
        defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        if self.image_size not in defaults:
            raise UsageError(
                f"--model-flags: no default channel_mult for image_size {self.image_size}; pass --channel_mult"
            )
        return defaults[self.image_size]

    def attention_ds(self) -> tuple[int, ...]:
        """attention_resolutions are feature-map sizes; the network wants downsample rates."""
        text = str(self.attention_resolutions).strip()
        if not text:
            return ()
        return tuple(self.image_size // int(r) for r in text.split(","))

    @property
    def out_channels(self) -> int:
        return 6 if self.learn_sigma else 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TYPES = {f.name: f.type for f in fields(ADMFlags)}


def _convert(name: str, value: Any, source: str) -> Any:
    kind = _TYPES[name]
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "y", "t"):
                return True
            if text in ("false", "0", "no", "n", "f"):
                return False
            raise ValueError(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if isinstance(value, list | tuple):
            return ",".join(str(v) for v in value)
        return str(value)
    except (TypeError, ValueError):
        raise UsageError(f"{source}: --{name} {value!r} is not a valid {kind}") from None


def flags_from_mapping(values: dict[str, Any], source: str = "--model-flags", base: ADMFlags | None = None) -> ADMFlags:
    flags = ADMFlags(**(base.to_dict() if base else {}))
    unknown = []
    for key, value in values.items():
        name = key.lstrip("-").replace("-", "_")
        if name in IGNORED_FLAGS:
            continue
        if name not in _TYPES:
            unknown.append(f"--{name}")
            continue
        setattr(flags, name, _convert(name, value, source))
    if unknown:
        raise UsageError(f"{source}: unknown ADM flag(s) {', '.join(unknown)} (known: {', '.join(sorted(_TYPES))})")
    return flags


def parse_flag_string(text: str, source: str = "--model-flags") -> dict[str, str]:
    """``"--attention_resolutions 32,16,8 --learn_sigma True"`` (also ``--key=value``) → dict."""
    tokens = shlex.split(text, comments=True)
    values: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise UsageError(f"{source}: expected --flag value pairs, found {tok!r}")
        if "=" in tok:
            key, value = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise UsageError(f"{source}: flag {tok} has no value")
            key, value = tok[2:], tokens[i + 1]
            i += 2
        values[key] = value
    return values


def load_flags(spec: str | dict | None, base: ADMFlags | None = None) -> ADMFlags:
    """``spec``: a flag string, a path to a JSON / TOML / flags file, a dict, or None (defaults)."""
    if spec is None:
        return ADMFlags(**(base.to_dict() if base else {}))
    if isinstance(spec, dict):
        return flags_from_mapping(spec, base=base)
    text = spec.strip()
    looks_like_path = not text.startswith("-") and "\n" not in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"--model-flags {text}: no such file (give the flag string or a JSON/TOML/flags file)")
        return _load_flags_file(path, base)
    return flags_from_mapping(parse_flag_string(text), base=base)


def _load_flags_file(path: Path, base: ADMFlags | None) -> ADMFlags:
    source = f"--model-flags {path}"
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{source}: cannot read ({exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(content)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{source}: invalid JSON ({exc})") from None
    elif suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(content)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{source}: invalid TOML ({exc})") from None
    else:  # a shell-style flags file: MODEL_FLAGS="--a 1 --b 2" lines or bare flags
        parts = []
        for line in content.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" in line and not line.startswith("-"):
                line = line.split("=", 1)[1].strip().strip("\"'")
            parts.append(line)
        return flags_from_mapping(parse_flag_string(" ".join(parts), source), source, base)
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a table/object of flags")
    # a config may nest the flags (e.g. {"flags": {...}} as in the reference fixtures, or {"model": {...}})
    for key in ("flags", "model_flags", "model"):
        if isinstance(data.get(key), dict):
            merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
            merged.update(data[key])
            data = merged
            break
    return flags_from_mapping(data, source, base)
