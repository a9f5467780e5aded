"""The shared noise math against closed forms and diffusers' schedulers."""

from __future__ import annotations

import math

import pytest
import torch

from cfx_cli.diffusion import (
    BridgeSchedule,
    GaussianDiffusion,
    ddim_step_from_alphas,
    ddim_transfer,
    get_beta_schedule,
    i2sb_betas,
    respace_betas,
    space_indices,
    space_timesteps,
    tweedie_x0,
)


def test_beta_schedules_match_diffusers():
    from diffusers import DDPMScheduler

    for name, kw in (
        ("linear", {"beta_start": 1e-4, "beta_end": 0.02}),
        ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
        ("cosine", {}),
    ):
        ours = get_beta_schedule(name, 1000, **kw)
        ref = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2" if name == "cosine" else name, **kw
        ).betas.double()
        assert torch.allclose(ours, ref, atol=1e-7, rtol=1e-5), name
    # guided-diffusion scales the linear schedule with the number of steps
    assert get_beta_schedule("linear", 500)[-1].item() == pytest.approx(0.04)
    # cosine: alpha_bar follows cos^2((t/T + s)/(1 + s) * pi/2) / f(0) where betas are not capped
    ab = torch.cumprod(1 - get_beta_schedule("cosine", 1000), 0)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ab[499].item() == pytest.approx(f(0.5) / f(0), rel=1e-9)


def test_space_timesteps_like_guided_diffusion():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(10, "4") == [0, 3, 6, 9]
    # sections of 101/100/100 steps (the first gets the remainder), 2, 3 and 1 steps from each
    steps = space_timesteps(301, "2,3,1")
    assert steps == [0, 100, 101, 151, 200, 201]  # round(49.5) = 50: half to even
    assert space_timesteps(100, "") == list(range(100))
    assert len(space_timesteps(500, "200")) == 200
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim6")  # no integer stride gives exactly 6 of 10 steps
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


def test_respaced_betas_reproduce_alphas_cumprod_at_kept_steps():
    betas = get_beta_schedule("linear", 1000)
    ac = torch.cumprod(1 - betas, 0)
    for spec in ("ddim25", "50", "10,20,30"):
        keep = space_timesteps(1000, spec)
        new_betas, tmap = respace_betas(betas, keep)
        assert tmap == keep
        assert torch.allclose(torch.cumprod(1 - new_betas, 0), ac[keep], rtol=1e-12)
    diff = GaussianDiffusion.from_config(1000, "linear", respacing="ddim25", rescale_timesteps=False)
    assert diff.model_timesteps(torch.tensor([0, 1, 24])).tolist() == [0.0, 40.0, 960.0]
    resc = GaussianDiffusion.from_config(4000, "linear", respacing="100", rescale_timesteps=True)
    assert resc.model_timesteps(99, batch=1).item() == pytest.approx(3999 * 1000 / 4000)
    # respacing a respaced schedule keeps the original times
    twice = GaussianDiffusion.from_config(1000).respaced("ddim100").respaced("ddim10")
    assert twice.model_timesteps(torch.arange(10)).tolist() == [float(i) for i in range(0, 1000, 100)]


def test_q_sample_and_tweedie_closed_form():
    d = GaussianDiffusion.from_config(1000, "linear")
    x0, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = d.q_sample(x0, t, eps)
    ab = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(xt.double(), ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6)
    ab = ab.float()
    assert torch.allclose(d.predict_x0_from_eps(xt, t, eps), x0, atol=1e-3)
    assert torch.allclose(tweedie_x0(xt, eps, ab), x0, atol=1e-3)
    assert torch.allclose(d.predict_eps_from_x0(xt, t, x0), eps, atol=1e-3)


def test_posterior_matches_diffusers_ddpm_and_learned_range():
    from diffusers import DDPMScheduler

    d = GaussianDiffusion.from_config(1000, "linear", sigma_small=True)
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, variance_type="fixed_small"
    )
    sched.set_timesteps(1000)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    for t in (999, 500, 1):
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        ours, out = d.ddpm_step(eps, x, t, noise=z)
        ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(t))
        assert torch.allclose(out.pred_x0, ref.pred_original_sample, atol=1e-4)
        assert torch.allclose(ours, ref.prev_sample, atol=1e-4, rtol=1e-4)  # diffusers: float32 schedule
        assert out.variance.flatten()[0].item() == pytest.approx(sched._get_variance(t).item(), rel=1e-4)
    # learned range: v = -1 → posterior variance, v = +1 → beta_t
    dl = GaussianDiffusion.from_config(1000, "linear", learn_sigma=True)
    t = torch.tensor([10, 10])
    out = torch.cat([eps.repeat(2, 1, 1, 1), torch.stack([-torch.ones(3, 4, 4), torch.ones(3, 4, 4)])], dim=1)
    res = dl.p_mean_variance(out, x.repeat(2, 1, 1, 1), t)
    assert res.variance[0].flatten()[0].item() == pytest.approx(dl.posterior_variance[10].item(), rel=1e-5)
    assert res.variance[1].flatten()[0].item() == pytest.approx(dl.betas[10].item(), rel=1e-5)
    # posterior mean = coef1 x0 + coef2 x_t with the closed-form coefficients
    b, ab, abp = dl.betas[10], dl.alphas_cumprod[10], dl.alphas_cumprod[9]
    c1, c2 = b * abp.sqrt() / (1 - ab), (1 - abp) * (1 - b).sqrt() / (1 - ab)
    assert torch.allclose(res.mean[0], (c1 * res.pred_x0[0] + c2 * x[0]).float(), atol=1e-5)


def test_ddpm_step_per_sample_timesteps_and_no_noise_at_zero():
    d = GaussianDiffusion.from_config(100, "linear", learn_sigma=False)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    z = torch.randn_like(x)
    both, _ = d.ddpm_step(eps, x, torch.tensor([0, 50]), noise=z)
    first, out0 = d.ddpm_step(eps[:1], x[:1], 0, noise=z[:1])
    second, _ = d.ddpm_step(eps[1:], x[1:], 50, noise=z[1:])
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-6)
    assert torch.allclose(first, out0.mean, atol=1e-7)  # no noise at t = 0


def test_ddim_step_equals_diffusers_ddim_scheduler():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sched.set_timesteps(50)
    ac = sched.alphas_cumprod.double()
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in sched.timesteps[[0, 10, 49]].tolist():
        prev = t - 1000 // 50
        ab_prev = ac[prev] if prev >= 0 else sched.final_alpha_cumprod.double()
        for eta in (0.0, 0.7):
            noise = torch.randn_like(x)
            ref = sched.step(eps, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
            x0 = tweedie_x0(x, eps, ac[t].float())
            ours = ddim_step_from_alphas(x0, eps, ac[t].float(), ab_prev.float(), eta, noise if eta else None)
            assert torch.allclose(ours, ref, atol=1e-5), (t, eta)
    # and the schedule-indexed form on a respaced GaussianDiffusion is the same update
    d = GaussianDiffusion.from_config(1000, "linear", respacing="ddim50")
    ref_sched = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True, steps_offset=0
    )
    ref_sched.set_timesteps(50)
    for i in (49, 20, 0):
        t_orig = int(d.timestep_map[i])
        ref = ref_sched.step(eps, t_orig, x, eta=0.0).prev_sample
        ours, _ = d.ddim_step(eps, x, i, eta=0.0)
        assert torch.allclose(ours, ref, atol=1e-5), i


def test_ddim_inversion_round_trip():
    d = GaussianDiffusion.from_config(1000, "linear", respacing="ddim20")
    x = torch.randn(2, 3, 4, 4)
    eps = torch.randn_like(x)  # a constant "network": inversion then denoising returns exactly
    x_up, _ = d.ddim_reverse_step(eps, x, 5)
    x_back, _ = d.ddim_step(eps, x_up, 6)
    assert torch.allclose(x_back, x, atol=1e-5)
    ab_a, ab_b = d.alphas_cumprod[3].float(), d.alphas_cumprod[9].float()
    assert torch.allclose(ddim_transfer(ddim_transfer(x, eps, ab_a, ab_b), eps, ab_b, ab_a), x, atol=1e-5)


def test_i2sb_schedule_and_bridge_marginals():
    betas = i2sb_betas(1000, 0.3)
    assert len(betas) == 1000 and torch.allclose(betas, betas.flip(0))
    assert betas[0].item() == pytest.approx(1e-4) and betas.max().item() < 0.3 / 1000
    b = BridgeSchedule(betas)
    s2 = torch.cumsum(betas, 0)
    sb2 = torch.cumsum(betas.flip(0), 0).flip(0)
    assert torch.allclose(b.mu_x0, sb2 / (s2 + sb2)) and torch.allclose(b.std_sb**2, s2 * sb2 / (s2 + sb2))
    x0, x1 = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    xt = b.q_sample(torch.tensor([0, 999]), x0, x1, ot_ode=True)
    assert xt[0].mean().item() < 0.01 and xt[1].mean().item() > 0.99
    assert b.network_time(torch.tensor([0, 999])).tolist() == pytest.approx([0.1, 1000.0])
    assert space_indices(1000, 3) == [0, 500, 999] and space_indices(1000, 5) == [0, 250, 500, 749, 999]
    # I2SB accumulates the float stride: 10 × 49.95 lands just below 499.5 → 499 (10 * 49.95 would give 500)
    assert space_indices(1000, 21)[10] == 499


def test_bridge_posterior_is_gaussian_product_and_recovers_x0():
    b = BridgeSchedule.from_options(1000, 0.3)
    x0, xn = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    n, prev = 800, 300
    s_prev2, s_n2 = b.std_fwd[prev] ** 2, b.std_fwd[n] ** 2
    expected = ((s_n2 - s_prev2) * x0 + s_prev2 * xn) / s_n2
    assert torch.allclose(b.posterior_step(prev, n, xn, x0), expected.float(), atol=1e-6)
    # stepping to 0 lands on x̂_0 up to σ_0² = β_0 = 1e-4 of weight on x_n
    w = (b.betas[0] / s_n2).item()
    assert torch.allclose(b.posterior_step(0, n, xn, x0), (1 - w) * x0 + w * xn, atol=1e-6) and w < 1e-3
    # an oracle network (predicts (x_t - x0)/σ_t) makes the OT-ODE sampler return x0 from any start
    x1 = torch.randn(2, 3, 4, 4)
    target = torch.randn(2, 3, 4, 4)
    calls = []

    def pred_x0(xt, step):
        calls.append(step)
        net = (xt - target) / b.std_fwd[step].float()
        return b.pred_x0(step, xt, net)

    out = b.sample(pred_x0, x1, nfe=10)
    # the last step leaves a weight β_0/σ_n² ≈ 1e-3 on x_n (σ_0 > 0), hence the tolerance
    assert torch.allclose(out, target, atol=1e-2) and len(calls) == 10 and calls[0] == 999
    assert not torch.allclose(x1, target, atol=1e-2)
    # truncated trajectory (RCSB): start at an intermediate step with a mask pasting the known region
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :2, :] = 1
    start = b.q_sample(600, target, x1, ot_ode=True)
    out = b.sample(pred_x0, start, nfe=6, mask=mask, x1=x1, start_step=600)
    assert torch.allclose(out * mask, target * mask, atol=1e-2) and torch.allclose(out * (1 - mask), x1 * (1 - mask))


def test_v_prediction_matches_diffusers_ddim():
    """SD 2.x 768-v UNets predict v = √ᾱ ε - √(1-ᾱ) x_0; converting to (ε, x̂_0) gives diffusers' DDIM step."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sched.set_timesteps(25)
    d = GaussianDiffusion(sched.betas.double(), prediction_type="v_prediction")
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in sched.timesteps[[0, 12, 24]].tolist():
        eps, x0 = d.eps_and_x0(v, x, t)
        prev = t - 1000 // 25
        ab_prev = d.alphas_cumprod[prev] if prev >= 0 else d.alphas_cumprod[0]
        ours = ddim_step_from_alphas(x0, eps, d.alphas_cumprod[t].float(), ab_prev.float())
        assert torch.allclose(ours, sched.step(v, t, x).prev_sample, atol=1e-4, rtol=1e-4), t


# -- the shared small math: Adam, guidance, resizing, the per-image noise source ------------------------------
def _quadratic_problem():
    """A per-row quadratic with minima of different scales (so the rows' Adam trajectories differ)."""
    g = torch.Generator().manual_seed(5)
    target = torch.randn(4, 3, 5, 5, generator=g) * torch.tensor([0.1, 1.0, 10.0, 3.0]).view(-1, 1, 1, 1)
    start = torch.randn(4, 3, 5, 5, generator=g)
    return target, start


def _torch_adam(start, target, steps: int, lr: float, rows=None):
    p = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(steps):
        opt.zero_grad()
        ((p - target) ** 2).sum().backward()
        opt.step()
    return p.detach()


def test_adam_update_equals_torch_optim_adam():
    from cfx_cli.optim import adam_update

    target, start = _quadratic_problem()
    x, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    for k in range(1, 31):
        m, v, update = adam_update(m, v, 2 * (x - target), k, (0.9, 0.999), 1e-8, lr=0.05)
        x = x - update
    ref = _torch_adam(start, target, 30, 0.05)
    assert (x - ref).abs().max().item() <= 1e-6
    assert (x - start).abs().max().item() > 0.5  # it moved: the comparison is not between two no-ops
    # lr = 1 (RCSB's stabilised direction): at the first step m̂ / (√v̂ + ε) = g / (|g| + ε) ≈ sign(g)
    g = torch.tensor([3.0, -0.5, 0.0])
    _, _, d = adam_update(torch.zeros(3), torch.zeros(3), g, 1)
    assert torch.allclose(d, g / (g.abs() + 1e-8))


def test_adam_rows_keeps_each_rows_own_trajectory():
    from cfx_cli.optim import AdamRows

    target, start = _quadratic_problem()
    x = start.clone()
    adam = AdamRows(x, lr=0.05)
    for k in range(20):
        rows = torch.tensor([0, 1, 2, 3] if k < 10 else [1, 3])  # rows 0 and 2 stop after 10 steps
        adam.step(x, 2 * (x[rows] - target[rows]), rows)
    for i, steps in ((0, 10), (1, 20), (2, 10), (3, 20)):
        alone = start[i:i + 1].clone()
        one = AdamRows(alone, lr=0.05)
        for _ in range(steps):
            one.step(alone, 2 * (alone - target[i:i + 1]), torch.tensor([0]))
        assert torch.equal(x[i:i + 1], alone), i  # a row's trajectory is its own, bit for bit
        # the per-row step counts are float32 tensors, so 1 − β2^k is computed in float32 (relative error ~1e-5
        # at k = 1, ECED's arithmetic since it was written): within 1e-5 of torch's Adam, not 1e-6
        ref = _torch_adam(start[i:i + 1], target[i:i + 1], steps, 0.05)
        assert (x[i:i + 1] - ref).abs().max().item() <= 1e-5, i


def test_guidance_closed_form_and_one_batched_call():
    from cfx_cli.diffusion.guidance import guided_eps, guided_eps_fn

    g = torch.Generator().manual_seed(2)
    pos, neg = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    w = 3.0
    assert torch.allclose(guided_eps(pos, neg, 1 + w), (1 + w) * pos - w * neg, atol=1e-6)  # eq. 5.11
    assert torch.allclose(guided_eps(pos, neg, 1.0), pos, atol=1e-6)  # g = 1: guidance off
    per_image = guided_eps(pos, neg, torch.tensor([1.0, 2.0, 4.0]))
    assert torch.allclose(per_image[0], pos[0], atol=1e-6)
    assert torch.allclose(per_image[2], 4 * pos[2] - 3 * neg[2], atol=1e-5)

    calls = []

    def unet_eps(z, t, embeds):  # ε depends on the conditioning: z·(embedding sum) + t
        calls.append((z.shape[0], embeds.shape[0]))
        return z * embeds.sum(dim=(1, 2)).view(-1, 1, 1, 1) + t

    z = torch.randn(3, 4, 2, 2, generator=g)
    cond, uncond = torch.randn(3, 5, 6, generator=g), torch.zeros(3, 5, 6)
    out = guided_eps_fn(unet_eps, cond, uncond, 7.5)(z, 10)
    assert calls == [(6, 6)]  # one network call of batch 2N
    e_c, e_u = unet_eps(z, 10, cond), unet_eps(z, 10, uncond)
    assert torch.allclose(out, e_u + 7.5 * (e_c - e_u), atol=1e-5)  # classifier-free guidance (Ho & Salimans)


def test_resize_images_identity_and_modes():
    import torch.nn.functional as F

    from cfx_cli.images import resize_images

    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 16, 16, generator=g)
    assert resize_images(x, (16, 16)) is x and resize_images(x, None) is x  # same size: untouched
    # plain bilinear at the same size is the identity too (the FID Inception always "resizes" to 299)
    assert torch.equal(F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False), x)
    small = resize_images(x, (8, 12))
    assert small.shape == (2, 3, 8, 12)
    assert torch.equal(small, F.interpolate(x, size=(8, 12), mode="bilinear", align_corners=False, antialias=True))
    assert not torch.equal(small, resize_images(x, (8, 12), antialias=False))  # antialiasing matters downwards
    mask = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    up = resize_images(mask, (32, 32), nearest=True)
    assert set(up.unique().tolist()) <= {0.0, 1.0} and torch.equal(up[..., ::2, ::2], mask)
    const = torch.full((1, 3, 16, 16), 0.25)
    assert torch.allclose(resize_images(const, (7, 9)), torch.full((1, 3, 7, 9), 0.25))


def test_seeded_noise_is_the_image_generator_stream_whatever_the_batch():
    from cfx_cli.diffusion.noise import SeededNoise

    shape = (3, 4, 4)
    together = SeededNoise().for_batch(["a", "b", "c"], [11, 22, 33], "cpu")
    alone = SeededNoise().for_batch(["c"], [33], "cpu")
    first = together.randn([0, 1, 2], shape, "z_tau")
    second = together.randn([2, 0], shape, "step", (0,))  # a subset, reordered
    block = together.randn_block([2], shape, [("a", ()), ("b", ())])
    assert first.shape == (3, *shape) and second.shape == (2, *shape) and block.shape == (1, 2, *shape)
    ref = torch.Generator().manual_seed(33)  # today's bytes: image c's own generator, in call order
    expected = [torch.randn(shape, generator=ref) for _ in range(2)]
    expected_block = torch.randn((2, *shape), generator=ref)
    assert torch.equal(first[2], expected[0]) and torch.equal(second[0], expected[1])
    assert torch.equal(block[0], expected_block)
    # the same image drawn alone gets the same numbers
    assert torch.equal(alone.randn([0], shape, "z_tau")[0], first[2])
    assert torch.equal(alone.randn([0], shape, "step", (0,))[0], second[0])
    assert not torch.equal(first[0], first[1])  # other seeds, other noise


def test_function_noise_is_order_free_and_sees_names_and_indices():
    from cfx_cli.diffusion.noise import Draw, FunctionNoise, constant_noise

    seen = []

    def fn(draw: Draw, shape):
        seen.append(draw)
        key = hash((draw.image, draw.name, draw.index)) % (2 ** 31)
        return torch.randn(shape, generator=torch.Generator().manual_seed(key))

    src = FunctionNoise(fn)
    a = src.for_batch(["x", "y"], [1, 2], "cpu")
    b = src.for_batch(["y"], [2], "cpu")
    s1 = a.randn([0, 1], (2, 3), "step", (4, 1))
    s0 = a.randn([0, 1], (2, 3), "step", (4, 0))
    assert torch.equal(b.randn([0], (2, 3), "step", (4, 0))[0], s0[1])  # another batch, another order
    assert torch.equal(b.randn([0], (2, 3), "step", (4, 1))[0], s1[1])
    assert not torch.equal(s0, s1)
    blk = a.randn_block([1], (2, 3), [("step", (4, 0)), ("step", (4, 1))])
    assert torch.equal(blk[0, 0], s0[1]) and torch.equal(blk[0, 1], s1[1])
    assert Draw("x", 1, "step", (4, 1)) in seen
    with pytest.raises(ValueError, match="shape"):
        FunctionNoise(lambda d, s: torch.zeros(1)).for_batch(["x"], [0], "cpu").randn([0], (2, 3), "z")
    # the fixtures' noise: every draw returns the same tensor
    c = constant_noise(1234).for_batch(["x", "y"], [0, 1], "cpu")
    eps = torch.randn((3, 4), generator=torch.Generator().manual_seed(1234))
    assert torch.equal(c.randn([0, 1], (3, 4), "z_tau")[1], eps)
    assert torch.equal(c.randn_block([0], (3, 4), [("a", ()), ("b", (3,))])[0, 1], eps)
