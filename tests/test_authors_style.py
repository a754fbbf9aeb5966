"""The benchmark's authors-style baseline computes what fd_trt's ``paper`` schedule computes."""

import pytest

from fd_trt.tools.authors_style import authors_style_latents

from conftest import rel_l2


@pytest.mark.parametrize("steps", [50, 20])
def test_authors_style_equals_fd_trt_paper_on_torch(fd_pipe, tiny_sd, latents, steps):
    ref = fd_pipe("a red circle", latents=latents, output_type="latent", schedule="paper", num_inference_steps=steps)
    mine = authors_style_latents(tiny_sd, "a red circle", latents, num_inference_steps=steps)
    assert rel_l2(mine, ref.latents) < 1e-6
