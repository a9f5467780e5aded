"""Every explainer draws its random numbers through ``ExplainContext.noise`` (cfx_cli.diffusion.noise): replacing
the source changes exactly the draws each method uses, and nothing else in a method is random."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

# the draws each method names (docs/plugins.md "Noise"); a method that stops using the source fails here
DRAWS = {
    "dime": {"z_tau", "guided_step", "x_t_chain"},
    "fastdime": {"z_tau", "guided_step", "mask_q_sample"},
    "ace": {"filter_q_sample", "filter_step", "refine_q_sample", "refine_known", "refine_step"},
    "rcsb": {"x1"},
    "eced": {"background_q_sample", "chain_start", "chain_step", "chain_background"},
}
SMALL = {  # the demo presets, cut down so that each method runs in seconds
    "dime": {"preset": "digits", "tau": "3", "scales": "10"},
    "fastdime": {"preset": "digits", "tau": "3", "warmup": "1", "scales": "10"},
    "ace": {"preset": "digits", "tau": "2", "iterations": "2"},
    "rcsb": {"preset": "digits", "nfe": "3"},
    "eced": {"preset": "digits", "tau": "2", "iterations": "1", "bg_iterations": "2"},
    "pgd": {"preset": "digits", "iterations": "3"},
    "time": {"preset": "digits", "schedule": "2:1", "steps": "10"},
}


@pytest.fixture(scope="module")
def classifier():
    from cfx_cli.classifiers import ClassifierOptions, load_classifier

    return load_classifier("demo:digits", ClassifierOptions())


def _explainer(method: str, classifier):
    from cfx_cli.explainers import ExplainContext
    from cfx_cli.params import resolve_params
    from cfx_cli.plugins import get_explainer_class

    cls = get_explainer_class(method)
    params = resolve_params(method, cls.params, cls.presets, dict(SMALL[method]))
    return cls(ExplainContext(classifier=classifier, params=params))


def _batch(seeds: list[int]):
    from cfx_cli.demo import IMAGES_DIR
    from cfx_cli.explainers import ExplainBatch
    from cfx_cli.images import decode

    paths = sorted(IMAGES_DIR.glob("*.png"))[:2]
    images = torch.from_numpy(np.stack([decode(p) for p in paths])).permute(0, 3, 1, 2).float().contiguous()
    masks = torch.zeros(2, 1, *images.shape[-2:])
    masks[..., 3:13, 3:13] = 1
    return ExplainBatch(ids=[p.stem for p in paths], images=images,
                        targets=torch.tensor([(int(p.stem[-1]) + 3) % 10 for p in paths]),
                        sources=torch.tensor([int(p.stem[-1]) for p in paths]), seeds=seeds, masks=masks)


def _keyed(offset: int, seen: list):
    """An order-free source: each draw is a function of (image, name, index) only (and ``offset``)."""
    from cfx_cli.diffusion.noise import FunctionNoise

    def fn(draw, shape):
        seen.append(draw.name)
        key = zlib.crc32(repr((draw.image, draw.name, draw.index, offset)).encode())
        return torch.randn(shape, generator=torch.Generator().manual_seed(key))

    return FunctionNoise(fn)


def _run(exp, source, seeds):
    exp.context.noise = source
    return torch.stack([o.counterfactual for o in exp.explain(_batch(seeds))])


@pytest.mark.parametrize("method", sorted(DRAWS))
def test_every_draw_goes_through_the_noise_source(method, classifier):
    from cfx_cli.diffusion.noise import SeededNoise

    exp = _explainer(method, classifier)
    seen: list[str] = []
    torch.manual_seed(0)
    a = _run(exp, _keyed(0, seen), [1, 2])
    assert set(seen) == DRAWS[method]
    # nothing else is random: other per-image seeds and another global RNG state change nothing
    torch.manual_seed(99)
    assert torch.equal(_run(exp, _keyed(0, []), [7, 8]), a)
    # other noise from the source, another counterfactual
    assert not torch.equal(_run(exp, _keyed(1, []), [1, 2]), a)
    # the default source draws from the per-image seeds: other seeds, other counterfactuals
    default = _run(exp, SeededNoise(), [1, 2])
    assert torch.equal(_run(exp, SeededNoise(), [1, 2]), default)
    assert not torch.equal(_run(exp, SeededNoise(), [5, 6]), default)


@pytest.mark.parametrize("method", ["pgd", "time"])
def test_deterministic_methods_draw_nothing(method, classifier):
    from cfx_cli.diffusion.noise import FunctionNoise

    def refuse(draw, shape):
        raise AssertionError(f"{method} drew {draw}")

    exp = _explainer(method, classifier)
    a = _run(exp, FunctionNoise(refuse), [1, 2])
    assert torch.equal(_run(exp, FunctionNoise(refuse), [3, 4]), a)
