"""How much each transformer block's output changes from one sampling step to the next: the
transformer analogue of the Faster Diffusion paper's Figure 3, behind the default split point N of
the DiT and PixArt families (docs/guides/dit.md).

A thin wrapper around :func:`fd_trt.tools.calibrate_dit.block_changes` (what ``fd-trt calibrate
--plot`` draws for a transformer) on the built-in models: it runs one ``schedule="all"`` call and
prints, per block ``i``, the mean over steps of ``||h_i(t_k) - h_i(t_{k-1})|| / ||h_i(t_{k-1})||``,
as JSON, with :func:`fd_trt.tools.calibrate_dit.suggest_split`'s N (the last block before the
change first exceeds ``--threshold`` times the final block's).

    python scripts/experiments/dit_block_change.py --model pixart-arch --steps 10
"""

from __future__ import annotations

import argparse
import json
import platform
import time

MODELS = ("tiny-dit", "tiny-pixart", "pixart-arch", "sd3-arch")


def _pipeline(name: str, size: int):
    from fd_trt.families import dit_models

    if name == "tiny-dit":
        return dit_models.tiny_dit_pipeline(seed=0), 207, {}
    if name == "tiny-pixart":
        return dit_models.tiny_pixart_pipeline(seed=0), "a red circle", {"max_sequence_length": 16}
    if name == "pixart-arch":
        return dit_models.pixart_arch_pipeline(seed=0, sample_size=size // 8), "a red circle", {}
    return dit_models.sd3_arch_pipeline(seed=0, sample_size=size // 8), "a red circle", {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-pixart", choices=MODELS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--size", type=int, default=256, help="image side of the -arch models (latents are size/8)")
    a = p.parse_args()

    from fd_trt import FasterDiffusionPipeline
    from fd_trt.tools.calibrate_dit import block_changes, suggest_split

    sd, cond, options = _pipeline(a.model, a.size)
    pipe = FasterDiffusionPipeline.from_diffusers(sd, backend="torch", progress=False)
    t0 = time.perf_counter()
    change = block_changes(pipe, cond, steps=a.steps, **options)
    res = {
        "model": a.model,
        "blocks": len(change),
        "steps": a.steps,
        "latent_side": int(sd.transformer.config.sample_size),
        "scheduler": type(sd.scheduler).__name__,
        "mean_relative_change_per_block": [round(v, 4) for v in change],
        "suggested_split": suggest_split(change, a.threshold),
        "threshold": a.threshold,
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
