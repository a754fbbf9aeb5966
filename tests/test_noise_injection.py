"""Prior noise injection means the same thing in every scheduler's latent space.

The paper adds ``alpha * x_T`` (x_T the unit initial noise) to DDIM's variance-preserving latents
whenever ``t < 500``. Euler keeps its latents in sigma space (``x = x0 + sigma * eps``, started at
``init_noise_sigma * eps``), which the UNet sees through ``scale_model_input`` as
``x / sqrt(sigma^2 + 1)``; there the same injection is ``alpha * eps * sqrt(sigma^2 + 1)``.
"""

import pytest
import torch

from fd_trt.core.features import Features
from fd_trt.core.runner import Runner
from fd_trt.core.sampler import SamplerInputs, SamplerOptions, run_sampler
from fd_trt.core.schedule import NoiseInjection, parse_schedule
from fd_trt.families.models import make_scheduler, tiny_sd_pipeline


class ZeroRunner(Runner):
    """Predicts zero noise: Euler then keeps the latents unchanged, so only injections move them."""

    name = "zero"

    def encode(self, sample, timestep, text, added=None):
        self.launches["encoder"] += 1
        return Features(torch.zeros(sample.shape[0], 1, 1, 1), ())

    def decode(self, features, timesteps, text, added=None):
        self.launches["decoder"] += 1
        return torch.zeros(features.rows * timesteps.shape[0], 4, 8, 8)


@pytest.fixture(scope="module")
def config():
    return tiny_sd_pipeline(seed=0).scheduler.config


def _sample(scheduler, eps, steps, noise):
    scheduler.set_timesteps(steps)
    text = torch.zeros(1, 16, 32)
    return run_sampler(
        ZeroRunner().activate(),
        scheduler,
        eps * scheduler.init_noise_sigma,
        SamplerInputs(text),
        parse_schedule("paper", steps),
        SamplerOptions(guidance_scale=1.0, noise=noise, progress=False),
    )


def test_euler_injection_is_the_papers_amount_in_the_models_input_space(config):
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sched = make_scheduler("euler", config)
    steps = 30
    out = _sample(sched, eps, steps, NoiseInjection(alpha=0.003))
    # Hand-computed: with zero noise predictions every Euler step keeps x, so the result is
    # x_T plus one injection per step with t < 500, each alpha * eps * sqrt(sigma_j^2 + 1).
    sigmas = sched.sigmas[:steps].double()
    late = sched.timesteps < 500
    expected = eps.double() * (float(sched.init_noise_sigma) + 0.003 * float((sigmas[late] ** 2 + 1).sqrt().sum()))
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=0)
    # The old rule added alpha * x_T in sigma space: 0.003 * init_noise_sigma * eps per step.
    old = eps.double() * float(sched.init_noise_sigma) * (1 + 0.003 * int(late.sum()))
    assert float((out - old).norm() / (old - eps.double() * float(sched.init_noise_sigma)).norm()) > 0.5


def test_ddim_injection_adds_the_unit_noise(config):
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sched = make_scheduler("ddim", config)
    on = _sample(sched, eps, 20, NoiseInjection(alpha=0.003))
    off = _sample(make_scheduler("ddim", config), eps, 20, NoiseInjection(enabled=False))
    # DDIM with zero noise predictions maps x -> sqrt(abar_prev / abar_t) x, a linear map per
    # step; the injection adds 0.003 * eps before each late step and is scaled by what follows.
    sched.set_timesteps(20)
    abar = sched.alphas_cumprod.double()
    ts = sched.timesteps.tolist()
    x = eps.double()
    for i, t in enumerate(ts):
        if t < 500:
            x = x + 0.003 * eps.double()
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_prev = abar[prev] if prev >= 0 else sched.final_alpha_cumprod.double()
        x = x * (a_prev / abar[t]).sqrt()
    assert torch.allclose(on.double(), x, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(on, off, rtol=1e-3)
