"""How much each transformer block's output changes from one sampling step to the next: the
transformer analogue of the Faster Diffusion paper's Figure 3, behind the default split point N of
the DiT and PixArt families (docs/guides/dit.md).

It samples with every step a key step (plain diffusers arithmetic), records each block's output
tokens at every step, and prints, per block ``i``, the mean over steps of
``||h_i(t_k) - h_i(t_{k-1})|| / ||h_i(t_{k-1})||``, as JSON. A suggested N is the last block
before the change of a block first exceeds ``--threshold`` times the change of the final block's output
(the front blocks whose output is stable enough to propagate).

    python scripts/experiments/dit_block_change.py --model pixart-arch --steps 10
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _model(name: str, size: int = 256):
    from fd_trt.families.dit_models import PIXART_ALPHA_TRANSFORMER, tiny_dit_pipeline, tiny_pixart_pipeline

    if name == "tiny-dit":
        return "dit", tiny_dit_pipeline(seed=0).transformer, None
    if name == "tiny-pixart":
        return "pixart", tiny_pixart_pipeline(seed=0).transformer, (16, 32)
    if name == "pixart-arch":
        from diffusers import PixArtTransformer2DModel

        torch.manual_seed(0)
        cfg = dict(PIXART_ALPHA_TRANSFORMER, sample_size=size // 8, use_additional_conditions=None)
        return "pixart", PixArtTransformer2DModel(**cfg).eval(), (120, 4096)
    raise SystemExit(f"unknown model {name!r}: tiny-dit, tiny-pixart or pixart-arch")


def measure(name: str, steps: int, seed: int = 0, size: int = 256) -> dict:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from fd_trt.families.dit_models import PIXART_SCHEDULER

    kind, tr, text_shape = _model(name, size)
    g = torch.Generator().manual_seed(seed)
    side = int(tr.config.sample_size)
    x = torch.randn(1, int(tr.config.in_channels), side, side, generator=g)
    if kind == "dit":
        sched = DDIMScheduler(**PIXART_SCHEDULER, clip_sample=False)
        kwargs = {"class_labels": torch.tensor([207])}
    else:
        sched = DPMSolverMultistepScheduler(**PIXART_SCHEDULER, algorithm_type="dpmsolver++")
        text = torch.randn(1, *text_shape, generator=g) * 0.1
        kwargs = {
            "encoder_hidden_states": text,
            "encoder_attention_mask": torch.ones(1, text_shape[0]),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    sched.set_timesteps(steps)
    outputs: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: current.append(o.detach().clone())) for b in tr.transformer_blocks]
    c = int(tr.config.in_channels)
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in sched.timesteps:
            current.clear()
            eps = tr(sched.scale_model_input(x, t), timestep=t.reshape(1), **kwargs).sample[:, :c]
            outputs.append(list(current))
            x = sched.step(eps, t, x).prev_sample
    for h in hooks:
        h.remove()
    blocks = len(tr.transformer_blocks)
    change = []
    for i in range(blocks):
        rel = [
            float((outputs[k][i] - outputs[k - 1][i]).norm() / outputs[k - 1][i].norm()) for k in range(1, len(outputs))
        ]
        change.append(sum(rel) / len(rel))
    return {
        "model": name,
        "blocks": blocks,
        "steps": steps,
        "latent_side": side,
        "scheduler": type(sched).__name__,
        "mean_relative_change_per_block": [round(v, 4) for v in change],
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu": platform.processor() or platform.machine(),
    }


def suggest(change: list[float], threshold: float) -> int:
    """The first block whose change exceeds ``threshold`` x the last block's, or all but one block."""
    last = change[-1]
    for i, v in enumerate(change):
        if v > threshold * last:
            return max(1, i)
    return len(change) - 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-pixart")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--size", type=int, default=256, help="image side of pixart-arch (latents are size/8)")
    a = p.parse_args()
    res = measure(a.model, a.steps, size=a.size)
    res["suggested_split"] = suggest(res["mean_relative_change_per_block"], a.threshold)
    res["threshold"] = a.threshold
    print(json.dumps(res))


if __name__ == "__main__":
    main()
