"""Freezes the authors' Faster Diffusion output on a tiny UNet, for tests/test_golden.py.

The reference is hutaiHang/Faster-Diffusion (commit d64bfed), ``utils_sd.py``:
``register_parallel_pipeline`` + ``register_faster_forward``, run with mod ``"50ls"`` (the paper's
key steps {0,1,2,3,5,10,15,25,35}) and mod ``5`` (fd_trt's ``uniform:5``), DDIM-50, guidance 7.5,
float32, prompt embeddings passed directly, ``output_type="latent"``. Its noise injection is
always on there: ``x += 0.003 * x_T`` before each scheduler step with ``timestep / 1000 < 0.5``.
The authors' code is read from a checkout given with ``--reference``; nothing of it is copied
into this repository.

Two steps, in two Python environments:

1. ``inputs``, in fd_trt's environment: writes a tiny UNet2DConditionModel (:data:`UNET_CONFIG`,
   diffusers' initialization under seed 0, weights stored as float16 and run as float32) as
   ``unet.safetensors`` + ``unet_config.json``, SD 1.x's DDIM settings as
   ``scheduler_config.json``, fixed text embeddings ``cond.npy`` / ``uncond.npy`` ([1,16,32]) and
   the initial latents ``latents.npy`` ([1,4,8,8]) into ``tests/data/golden/``::

       cd /work/wt-golden && PYTHONPATH=. /work/main/.venv/bin/python scripts/golden_authors.py inputs

2. ``reference``, in a separate environment with the diffusers the authors' code was written for
   (it does not import fd_trt). Setup used for the frozen files (CPU, Python 3.11.7)::

       python3 -m venv /work/venv-ref
       /work/venv-ref/bin/pip install torch==2.13.0 diffusers==0.23.1 huggingface_hub==0.25.2 \\
           transformers==4.30.2 "numpy<2" safetensors
       /work/venv-ref/bin/python scripts/golden_authors.py reference --reference /work/ref

   (diffusers 0.23 imports ``cached_download``, which huggingface_hub 0.26 removed, hence 0.25.2.)
   ``utils_sd.py`` imports ``cv2`` and ``controlnet_aux`` at module level for its ControlNet and
   data helpers only; this step puts empty stand-ins for those two modules in ``sys.modules``
   instead of installing OpenCV and controlnet_aux. The code that runs is the authors' own.

   It writes ``authors_paper.npy`` (mod "50ls"), ``authors_uniform5.npy`` (mod 5),
   ``authors_all.npy`` (the same StableDiffusionPipeline unpatched: plain diffusers 0.23.1 DDIM-50)
   and ``versions.json`` (library versions, reference commit, command lines).

Rerun both steps to refresh the files; step 1 must come first, since step 2 reads its output.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "data" / "golden"
REFERENCE_COMMIT = "d64bfed"
STEPS = 50
GUIDANCE = 7.5
HEIGHT = WIDTH = 64  # latents 8x8 with the factor-8 VAE below
TEXT_LENGTH = 16
#: SD's UNet layout in miniature: a cross-attention down block, a plain one, the cross-attention
#: mid block, and the mirrored up blocks (7 skips including conv_in's output).
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
RUNS = {"paper": "50ls", "uniform5": 5}  # output name -> the authors' `mod`


def make_inputs(out: Path) -> None:
    """Step 1, fd_trt's environment: the tiny UNet, scheduler settings, embeddings and latents."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from fd_trt.families.models import sd_scheduler_config

    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    # Stored as float16 to keep the file small; both sides load them as float32 and compute in
    # float32, so both run the same (fp16-representable) float32 weights.
    save_file({k: v.detach().contiguous().half() for k, v in unet.state_dict().items()}, str(out / "unet.safetensors"))
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    (out / "unet_config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    (out / "scheduler_config.json").write_text(json.dumps(sd_scheduler_config(), indent=1, sort_keys=True) + "\n")
    g = torch.Generator().manual_seed(2024)
    length, width = TEXT_LENGTH, int(unet.config.cross_attention_dim)
    np.save(out / "cond.npy", torch.randn(1, length, width, generator=g).numpy())
    np.save(out / "uncond.npy", torch.randn(1, length, width, generator=g).numpy())
    np.save(out / "latents.npy", torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=g).numpy())
    print(f"wrote the inputs to {out}")


def _stub_unused_imports() -> None:
    """utils_sd.py imports cv2 and controlnet_aux for helpers the golden run does not call."""
    for name in ("cv2", "controlnet_aux"):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
    sys.modules["controlnet_aux"].HEDdetector = None  # type: ignore[attr-defined]
    sys.modules["controlnet_aux"].OpenposeDetector = None  # type: ignore[attr-defined]


def run_reference(out: Path, reference: Path) -> None:
    """Step 2, the reference environment: the authors' pipeline on the step-1 inputs."""
    import diffusers
    import huggingface_hub
    import torch
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    _stub_unused_imports()
    sys.path.insert(0, str(reference))
    import utils_sd  # the authors' module

    torch.manual_seed(0)
    config = json.loads((out / "unet_config.json").read_text())
    weights = load_file(str(out / "unet.safetensors"))
    sched_config = json.loads((out / "scheduler_config.json").read_text())
    cond = torch.from_numpy(np.load(out / "cond.npy"))
    uncond = torch.from_numpy(np.load(out / "uncond.npy"))
    x_T = torch.from_numpy(np.load(out / "latents.npy"))

    def fresh_pipe() -> StableDiffusionPipeline:
        unet = UNet2DConditionModel.from_config(config)  # keys this diffusers does not know are ignored
        unet.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
        unet.eval()
        # A random VAE with SD's factor 8: the pipeline reads vae_scale_factor from it; with
        # output_type="latent" it never runs.
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=32,
        )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            unet=unet,
            scheduler=DDIMScheduler.from_config(sched_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    common = dict(
        prompt_embeds=cond.clone(),
        negative_prompt_embeds=uncond.clone(),
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=HEIGHT,
        width=WIDTH,
        output_type="latent",
    )
    with torch.no_grad():
        for name, mod in RUNS.items():
            pipe = fresh_pipe()
            pipe.set_progress_bar_config(disable=True)
            utils_sd.register_parallel_pipeline(pipe, mod=mod)
            utils_sd.register_faster_forward(pipe.unet, mod=mod)
            lat = pipe.call(latents=x_T.clone(), **common).images
            np.save(out / f"authors_{name}.npy", lat.float().numpy())
            print(f"{name} (mod={mod!r}): |x0| = {float(lat.norm()):.6f}")
        pipe = fresh_pipe()
        pipe.set_progress_bar_config(disable=True)
        lat = pipe(latents=x_T.clone(), **common).images
        np.save(out / "authors_all.npy", lat.float().numpy())
        print(f"all (plain diffusers {diffusers.__version__}): |x0| = {float(lat.norm()):.6f}")

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "numpy": np.__version__,
        "reference_repo": "https://github.com/hutaiHang/Faster-Diffusion",
        "reference_commit": REFERENCE_COMMIT,
        "reference_functions": "utils_sd.register_parallel_pipeline + utils_sd.register_faster_forward",
        "stand_ins": "empty cv2 and controlnet_aux modules (imported by utils_sd.py, unused here)",
        "runs": {
            "authors_paper.npy": "mod='50ls', DDIM-50, guidance 7.5, float32, noise injection on (always on in utils_sd)",
            "authors_uniform5.npy": "mod=5, otherwise the same",
            "authors_all.npy": "the unpatched StableDiffusionPipeline.__call__, DDIM-50, guidance 7.5, float32",
        },
        "setup": [
            "python3 -m venv /work/venv-ref",
            "/work/venv-ref/bin/pip install torch==2.13.0 diffusers==0.23.1 huggingface_hub==0.25.2 "
            'transformers==4.30.2 "numpy<2" safetensors',
        ],
        "commands": [
            "cd /work/wt-golden && PYTHONPATH=. /work/main/.venv/bin/python scripts/golden_authors.py inputs",
            "cd /work/wt-golden && /work/venv-ref/bin/python scripts/golden_authors.py reference --reference /work/ref",
        ],
    }
    (out / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
    print(f"wrote the reference latents and versions.json to {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("inputs", "reference"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the golden files")
    ap.add_argument("--reference", type=Path, help="checkout of hutaiHang/Faster-Diffusion (for `reference`)")
    args = ap.parse_args(argv)
    if args.step == "inputs":
        make_inputs(args.out)
    else:
        if args.reference is None or not (args.reference / "utils_sd.py").is_file():
            ap.error("reference needs --reference DIR, a checkout of hutaiHang/Faster-Diffusion with utils_sd.py")
        run_reference(args.out, args.reference)


if __name__ == "__main__":
    main()
