"""Calibration of a diffusion transformer: the split point N together with the key steps.

For every candidate N and every candidate key-step schedule, the search runs the calibration
prompts (or class labels) on the torch backend and measures the rel. L2 of the final latents
against ``schedule="all"``; it keeps the cheapest pair (fewest transformer block evaluations) whose
error is at most ``tolerance``, or the most accurate one when none is. The result is a
[`Calibration`][fd_trt.core.calibration.Calibration] with ``split`` set, which the transformer pipelines take
as ``schedule=`` (the object or its saved JSON path); they then run at its N.

[`block_changes()`][fd_trt.tools.calibrate_dit.block_changes] measures what the split rests on, the
transformer analogue of the paper's Figure 3: how much each block's output changes from one step to
the next; [`plot_block_changes()`][fd_trt.tools.calibrate_dit.plot_block_changes] draws it
(``fd-trt calibrate --plot``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fd_trt.core.calibration import Calibration
from fd_trt.core.schedule import KeySchedule, parse_schedule, power_steps
from fd_trt.errors import InputError
from fd_trt.graphs.weights import unet_weights_sha256


def candidate_schedules(steps: int) -> list[tuple[int, ...]]:
    """Key-step candidates for ``steps`` steps: ``paper`` at ``steps`` (as ``schedule="paper"`` runs it),
    uniform every 2 to 5 steps, a dense head (every step in the first fifth) with every third
    after, and ``power:K`` (K steps dense at the start, P = 1.5) for K from 3 to half the steps
    (every ``steps // 20``-th K), the family that reaches a given error with the fewest key steps
    on the UNets (docs/guides/deepcache-front.md)."""
    out: set[tuple[int, ...]] = set()
    out.add(parse_schedule("paper", steps).key_steps)  # what schedule='paper' runs at this step count
    for every in (2, 3, 4, 5):
        out.add(tuple(range(0, steps, every)))
    head = max(1, steps // 5)
    out.add(tuple(sorted(set(range(head)) | set(range(head, steps, 3)))))
    for count in range(min(3, steps), steps // 2 + 1, max(1, steps // 20)):
        out.add(power_steps(count, steps))
    return sorted(out, key=lambda keys: (len(keys), keys))


def block_evaluations(key_steps: Sequence[int], steps: int, split: int, blocks: int) -> float:
    """Transformer block evaluations per row, as full forwards: ``(K*N + S*(B-N)) / B``."""
    return (len(key_steps) * split + steps * (blocks - split)) / blocks


def calibrate_transformer(
    pipe: Any,
    conds: Sequence[Any],
    *,
    steps: int,
    splits: Sequence[int] | None = None,
    schedules: Sequence[Sequence[int]] | None = None,
    tolerance: float = 0.05,
    guidance_scale: float | None = None,
    seeds: Sequence[int] | None = None,
    **call_options: Any,
) -> Calibration:
    """Searches N and the key steps for a [`FasterDiffusionTransformerPipeline`][fd_trt.pipelines.transformer.FasterDiffusionTransformerPipeline].

    Args:
        pipe: the pipeline (its backend is used as is; torch is the reference).
        conds: prompts (PixArt) or class labels (DiT), one run each.
        steps: inference steps.
        splits: candidate N; a quarter, half and three quarters of the blocks by default.
        schedules: candidate key steps; [`candidate_schedules()`][fd_trt.tools.calibrate_dit.candidate_schedules] by default.
        tolerance: the largest rel. L2 against ``all`` accepted.
        guidance_scale: CFG weight (the pipeline's default when ``None``).
        seeds: one per cond (0, 1, ... by default).
        **call_options: more arguments of each call (``max_sequence_length``, ...).
    """
    if not conds:
        raise InputError("calibration needs at least one prompt or class label")
    blocks = len(pipe.transformer.transformer_blocks)
    splits = list(splits) if splits else sorted({max(1, round(f * blocks)) for f in (0.25, 0.5, 0.75)})
    cands = [tuple(s) for s in schedules] if schedules else candidate_schedules(steps)
    for s in cands:
        KeySchedule(s, steps)  # validates
    seeds = list(seeds) if seeds is not None else list(range(len(conds)))
    t0 = time.perf_counter()
    kw = dict(call_options, num_inference_steps=steps, output_type="latent")
    if guidance_scale is not None:
        kw["guidance_scale"] = guidance_scale
    is_dit = not pipe.family.takes_prompts

    def run(cond: Any, seed: int, schedule: Any, split: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        args = {"class_labels": cond} if is_dit else {"prompt": cond}
        return pipe(**args, generator=g, schedule=schedule, split=split, **kw).latents

    refs = [run(c, s, "all", splits[0]) for c, s in zip(conds, seeds)]
    history = []
    best: tuple[tuple[float, float], dict[str, Any]] | None = None
    for split in splits:
        for keys in cands:
            errs = [float((run(c, s, list(keys), split) - r).norm() / r.norm()) for c, s, r in zip(conds, seeds, refs)]
            err = sum(errs) / len(errs)
            cost = block_evaluations(keys, steps, split, blocks)
            entry = {"split": split, "key_steps": list(keys), "error": err, "block_evaluations": cost}
            history.append(entry)
            rank = (0.0 if err <= tolerance else 1.0, cost if err <= tolerance else err)
            if best is None or rank < best[0]:
                best = (rank, entry)
    assert best is not None
    chosen = best[1]
    paper = parse_schedule("paper", steps).key_steps
    paper_err = next(
        (h["error"] for h in history if tuple(h["key_steps"]) == paper and h["split"] == chosen["split"]), None
    )
    from fd_trt.families.models import scheduler_name

    return Calibration(
        key_steps=list(chosen["key_steps"]),
        scheduler=scheduler_name(pipe.sd.scheduler) or type(pipe.sd.scheduler).__name__,
        steps=steps,
        model_sha256=unet_weights_sha256(pipe.transformer),
        error=float(chosen["error"]),
        method=f"grid over N x key steps, tolerance {tolerance}",
        prompts=[str(c) for c in conds],
        seeds=seeds,
        guidance=float(kw.get("guidance_scale", pipe.family.default_guidance)),
        seconds=time.perf_counter() - t0,
        estimated_speedup=steps / chosen["block_evaluations"],
        paper_error=paper_err,
        evaluations=len(history) * len(conds),
        steps_run=steps,
        history=history,
        split=int(chosen["split"]),
    )


def _image_tokens(output: Any) -> torch.Tensor:
    """A block's image tokens: the output of a DiT or PixArt block, the second stream of an SD3
    joint block (``(encoder_hidden_states, hidden_states)``)."""
    return output[-1] if isinstance(output, tuple) else output


def block_changes(
    pipe: Any,
    cond: Any,
    *,
    steps: int,
    seed: int = 0,
    guidance_scale: float | None = None,
    **call_options: Any,
) -> list[float]:
    """Per transformer block ``i``, the mean over steps ``k`` of
    ``||h_i(t_k) - h_i(t_k-1)|| / ||h_i(t_k-1)||``, with ``h_i`` the block's output tokens (all the
    rows of a call, CFG's included) in a ``schedule="all"`` run (every step a full forward, as
    diffusers): the transformer analogue of the paper's Figure 3. Blocks whose output changes
    little between steps are the ones whose features can be propagated from a key step.

    Args:
        pipe: a [`FasterDiffusionTransformerPipeline`][fd_trt.pipelines.transformer.FasterDiffusionTransformerPipeline]
            on the torch backend (its blocks run as modules, so their outputs can be read).
        cond: one prompt (PixArt, SD3) or class label (DiT).
        steps: inference steps (at least 2).
        seed: the initial noise's seed.
        guidance_scale: CFG weight (the pipeline's default when ``None``).
        **call_options: more arguments of the call (``max_sequence_length``, ``height``, ...).

    Raises:
        InputError: for fewer than 2 steps, or a backend whose blocks do not run as torch modules.
    """
    if steps < 2:
        raise InputError(f"the block change needs at least 2 steps, got {steps}")
    # the torch runner's transformer: the pipeline's own, or its copy on the run's device and dtype
    tr = pipe.run_transformer() if pipe.backend == "torch" else pipe.transformer
    blocks = list(tr.transformer_blocks)
    outputs: list[list[torch.Tensor]] = [[] for _ in blocks]

    def recorder(i: int) -> Any:
        return lambda module, inputs, output: outputs[i].append(_image_tokens(output).detach().float().clone())

    hooks = [b.register_forward_hook(recorder(i)) for i, b in enumerate(blocks)]
    try:
        args = {"prompt": cond} if pipe.family.takes_prompts else {"class_labels": cond}
        pipe(
            **args,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            guidance_scale=guidance_scale,
            schedule="all",
            output_type="latent",
            **call_options,
        )
    finally:
        for h in hooks:
            h.remove()
    if any(len(o) < 2 for o in outputs):
        raise InputError(
            f"the {pipe.backend} backend runs the transformer blocks as a graph, so their outputs cannot be "
            "read: measure the block change with backend='torch'"
        )
    change = []
    for seq in outputs:
        rel = [float((b - a).norm() / a.norm()) for a, b in zip(seq, seq[1:])]
        change.append(sum(rel) / len(rel))
    return change


def suggest_split(change: Sequence[float], threshold: float = 0.8) -> int:
    """A split point from [`block_changes()`][fd_trt.tools.calibrate_dit.block_changes]: the first block
    whose change exceeds ``threshold`` times the last block's (the blocks before it are stable
    enough to propagate), at least 1; all but the last block when none does."""
    last = change[-1]
    for i, v in enumerate(change):
        if v > threshold * last:
            return max(1, i)
    return len(change) - 1


def plot_block_changes(
    change: Sequence[float], path: str | os.PathLike[str], split: int | None = None, title: str = ""
) -> Path:
    """Plots [`block_changes()`][fd_trt.tools.calibrate_dit.block_changes] per block to a PNG, the
    split point ``N`` marked (blocks ``0..N-1`` are the encoder).

    Raises:
        InputError: when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install matplotlib (or '.[bench]')") from None

    n = len(change)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * n + 2), 4))
    colors = ["tab:blue" if split is not None and i < split else "tab:orange" for i in range(n)]
    ax.bar(range(n), change, color=colors)
    if split is not None:
        ax.axvline(split - 0.5, color="black", ls="--", lw=1, label=f"split N={split}: encoder blocks 0..{split - 1}")
        ax.legend()
    ax.set(
        xlabel="transformer block",
        ylabel="mean ||h(t_k) - h(t_k-1)|| / ||h(t_k-1)||",
        title=title or "relative change of each block's output between adjacent steps",
    )
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


__all__ = [
    "block_changes",
    "block_evaluations",
    "calibrate_transformer",
    "candidate_schedules",
    "plot_block_changes",
    "suggest_split",
]
