"""Cross-check cfx's ADM UNet, Gaussian diffusion math and I2SB bridge against the authors' code.

Nothing of that code is in cfx: point this script at checkouts you have (it imports them from there).

    python scripts/crosscheck_reference_code.py --guided-diffusion PATH/guided-diffusion --i2sb PATH/I2SB

``--guided-diffusion`` is a folder containing the ``guided_diffusion`` package (openai/guided-diffusion, or the
copy inside NVlabs/I2SB); ``--i2sb`` is an NVlabs/I2SB checkout (only ``i2sb/diffusion.py`` is loaded, with its
debugger import stubbed). Prints the max abs difference of every comparison; exits 1 if one exceeds 1e-5.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types

import numpy as np
import torch

from cfx_cli.diffusion import BridgeSchedule, GaussianDiffusion, i2sb_betas, space_indices
from cfx_cli.models.adm import build_unet, load_flags

TOL = 1e-5
failures: list[str] = []


def report(name: str, diff: float) -> None:
    flag = "" if diff <= TOL else "   <-- FAIL"
    if flag:
        failures.append(name)
    print(f"{name:60s} {diff:.2e}{flag}")


def check_unet(gd) -> None:
    cases = [
        dict(
            image_size=32,
            num_channels=32,
            num_res_blocks=2,
            channel_mult="1,2,2",
            attention_resolutions="16,8",
            num_heads=4,
            use_new_attention_order=True,
            class_cond=True,
            learn_sigma=True,
            num_classes=10,
        ),
        dict(
            image_size=32,
            num_channels=64,
            num_res_blocks=1,
            channel_mult="1,2",
            attention_resolutions="32,16",
            num_heads=2,
            num_heads_upsample=4,
            resblock_updown=False,
            use_scale_shift_norm=False,
        ),
        dict(
            image_size=64,
            num_channels=32,
            num_res_blocks=1,
            attention_resolutions="8",
            num_head_channels=32,
            resblock_updown=True,
            in_channels=6,
        ),
    ]
    for i, kw in enumerate(cases):
        f = load_flags(kw)
        ref = gd.unet.UNetModel(
            image_size=f.image_size,
            in_channels=f.in_channels,
            model_channels=f.num_channels,
            out_channels=f.out_channels,
            num_res_blocks=f.num_res_blocks,
            attention_resolutions=f.attention_ds(),
            channel_mult=f.channel_mult_tuple(),
            num_classes=f.num_classes if f.class_cond else None,
            num_heads=f.num_heads,
            num_head_channels=f.num_head_channels,
            num_heads_upsample=f.num_heads_upsample,
            use_scale_shift_norm=f.use_scale_shift_norm,
            resblock_updown=f.resblock_updown,
            use_new_attention_order=f.use_new_attention_order,
        ).eval()
        torch.manual_seed(i)
        for p in ref.parameters():
            p.data.normal_(0, 0.05)
        ours = build_unet(f).eval()
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(2, f.in_channels, f.image_size, f.image_size)
        t = torch.tensor([3.5, 700.0])
        y = torch.tensor([1, 7]) if f.class_cond else None
        with torch.no_grad():
            report(
                f"UNet case {i} ({', '.join(f'{k}={v}' for k, v in kw.items() if k != 'image_size')[:40]}…)",
                (ours(x, t, y) - ref(x, t, y)).abs().max().item(),
            )


def check_gaussian(gd) -> None:
    for steps, schedule, respacing, learn in [
        (1000, "linear", "250", True),
        (500, "linear", "200", True),
        (1000, "cosine", "ddim50", False),
        (4000, "cosine", "10,20,30", True),
    ]:
        ref = gd.script_util.create_gaussian_diffusion(
            steps=steps, learn_sigma=learn, noise_schedule=schedule, timestep_respacing=respacing
        )
        ours = GaussianDiffusion.from_config(steps, schedule, respacing=respacing, learn_sigma=learn)
        torch.manual_seed(0)
        x = torch.randn(4, 3, 8, 8) * 2
        t = torch.tensor([0, 1, ours.num_steps // 2, ours.num_steps - 1])
        out = torch.randn(4, 6 if learn else 3, 8, 8) * 0.5
        seen: list[torch.Tensor] = []

        def model(xx, tt, _seen=seen, _out=out, **_):
            _seen.append(tt.clone())
            return _out

        label = f"{steps} {schedule} respaced {respacing!r}"
        r = ref.p_mean_variance(model, x, t, clip_denoised=False)
        o = ours.p_mean_variance(out, x, t)
        report(f"{label}: model times", (seen[0].float() - ours.model_timesteps(t)).abs().max().item())
        report(f"{label}: p_mean_variance mean", (r["mean"] - o.mean).abs().max().item())
        report(f"{label}: p_mean_variance log variance", (r["log_variance"] - o.log_variance).abs().max().item())
        report(f"{label}: x0 (Tweedie)", (r["pred_xstart"] - o.pred_x0).abs().max().item())
        noise = torch.randn_like(x)
        original = torch.randn_like
        torch.randn_like = lambda *_a, _n=noise, **_k: _n  # the reference draws its noise inside
        try:
            for clip in (False, True):
                rs = ref.p_sample(model, x, t, clip_denoised=clip)["sample"]
                rd = ref.ddim_sample(model, x, t, eta=0.5, clip_denoised=clip)["sample"]
                report(
                    f"{label}: ddpm step (clip={clip})",
                    (rs - ours.ddpm_step(out, x, t, noise=noise, clip_denoised=clip)[0]).abs().max().item(),
                )
                report(
                    f"{label}: ddim step eta 0.5 (clip={clip})",
                    (rd - ours.ddim_step(out, x, t, 0.5, noise, clip_denoised=clip)[0]).abs().max().item(),
                )
        finally:
            torch.randn_like = original
        tt = t[1:3]
        rr = ref.ddim_reverse_sample(lambda *_a, _o=out, **_k: _o[1:3], x[1:3], tt, clip_denoised=False)["sample"]
        report(f"{label}: ddim reverse step", (rr - ours.ddim_reverse_step(out[1:3], x[1:3], tt)[0]).abs().max().item())
        report(f"{label}: q_sample", (ref.q_sample(x, t, noise=noise) - ours.q_sample(x, t, noise)).abs().max().item())


def load_i2sb_diffusion(root: str):
    """I2SB's i2sb/diffusion.py alone: a synthetic package with its util helper and a stub debugger."""
    sys.modules.setdefault("ipdb", types.SimpleNamespace(set_trace=lambda *a, **k: None))
    pkg = types.ModuleType("i2sb_ref")
    pkg.__path__ = []
    util = types.ModuleType("i2sb_ref.util")
    util.unsqueeze_xdim = lambda z, xdim: z[(...,) + (None,) * len(xdim)]
    sys.modules.update({"i2sb_ref": pkg, "i2sb_ref.util": util})
    spec = importlib.util.spec_from_file_location("i2sb_ref.diffusion", f"{root}/i2sb/diffusion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_bridge(i2sb_root: str) -> None:
    mod = load_i2sb_diffusion(i2sb_root)
    interval, beta_max = 1000, 0.3
    ramp = (torch.linspace(1e-4**0.5, (beta_max / interval) ** 0.5, interval, dtype=torch.float64) ** 2).numpy()
    betas = np.concatenate([ramp[: interval // 2], np.flip(ramp[: interval // 2])])  # I2SB Runner.__init__
    report("I2SB betas", float(np.abs(betas - i2sb_betas(interval, beta_max).numpy()).max()))
    ref = mod.Diffusion(betas, "cpu")
    ours = BridgeSchedule.from_options(interval, beta_max)
    for name in ("std_fwd", "std_bwd", "std_sb", "mu_x0", "mu_x1"):
        report(f"I2SB {name}", (getattr(ref, name).double() - getattr(ours, name)).abs().max().item())
    torch.manual_seed(0)
    x0, x1 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    step = torch.tensor([10, 700])
    report(
        "I2SB q_sample (OT-ODE)",
        (ref.q_sample(step, x0, x1, ot_ode=True) - ours.q_sample(step, x0, x1, ot_ode=True)).abs().max().item(),
    )
    report(
        "I2SB p_posterior",
        (ref.p_posterior(300, 800, x1, x0, ot_ode=True) - ours.posterior_step(300, 800, x1, x0)).abs().max().item(),
    )
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    target = torch.randn(2, 3, 8, 8)

    def fn(xt, _s):
        return xt - 0.3 * (xt - target)

    steps = space_indices(interval, 11)
    for m in (None, mask):
        xs, _ = ref.ddpm_sampling(steps, fn, x1, mask=m, ot_ode=True, verbose=False)
        report(
            f"I2SB OT-ODE sampler ({'inpainting' if m is not None else 'plain'}), 10 NFE",
            (xs[:, 0] - ours.sample(fn, x1, nfe=10, mask=m, x1=x1)).abs().max().item(),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guided-diffusion", help="folder containing the guided_diffusion package")
    ap.add_argument("--i2sb", help="an NVlabs/I2SB checkout")
    args = ap.parse_args()
    if args.guided_diffusion:
        sys.path.insert(0, args.guided_diffusion)
        import guided_diffusion.script_util
        import guided_diffusion.unet

        check_unet(guided_diffusion)
        check_gaussian(guided_diffusion)
    if args.i2sb:
        check_bridge(args.i2sb)
    if failures:
        print(f"{len(failures)} comparison(s) above {TOL}")
        sys.exit(1)


if __name__ == "__main__":
    main()
