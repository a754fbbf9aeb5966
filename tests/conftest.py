import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if "FD_TRT_CACHE" not in os.environ:  # graphs built on first use go to a throwaway folder, not ~/.cache
    import tempfile

    os.environ["FD_TRT_CACHE"] = tempfile.mkdtemp(prefix="fd_trt_test_cache_")

import pytest
import torch

from fd_trt.families.models import make_scheduler, tiny_sd_pipeline
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="session")
def tiny_sd():
    """A tiny random-weight StableDiffusionPipeline (diffusers' own class), built in code."""
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="session")
def fd_pipe(tiny_sd):
    """FasterDiffusionPipeline wrapping the same components on the torch backend."""
    return FasterDiffusionPipeline.from_diffusers(tiny_sd, backend="torch", device="cpu", progress=False)


@pytest.fixture
def use_scheduler(tiny_sd):
    """Sets the shared pipeline's scheduler for one test, then restores DDIM."""
    original = tiny_sd.scheduler

    def set_(name: str):
        tiny_sd.scheduler = make_scheduler(name, original.config)
        return tiny_sd.scheduler

    yield set_
    tiny_sd.scheduler = original


@pytest.fixture
def latents():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1234))
