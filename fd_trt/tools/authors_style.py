"""The peer baseline of the benchmark: Faster Diffusion run the authors' way, on diffusers modules.

The authors (hutaiHang/Faster-Diffusion) patch the diffusers UNet and pipeline: at a key step the
down blocks and the mid block run on the key step's rows, and the up path runs on all the steps up
to the next key step at once, with the skip features repeated for each of those steps and every
row carrying its own timestep. Everything stays eager PyTorch on the diffusers modules; there is
no graph backend, no runner and no call-size tuning.

This module re-implements that way of running, written here from the description above and
diffusers' public module attributes (``conv_in``, ``time_proj``, ``time_embedding``,
``down_blocks``, ``mid_block``, ``up_blocks``, ``conv_norm_out``, ``conv_act``, ``conv_out``).
It is the same algorithm as fd_trt's ``paper`` schedule (docs/design.md section 1), so it must give
the same latents within float tolerance; only the engineering differs. It does not use
[`fd_trt.graphs.split`][fd_trt.graphs.split] or [`fd_trt.core.sampler`][fd_trt.core.sampler] on purpose: it is the baseline they are measured
against.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from fd_trt.core.schedule import PAPER_KEY_STEPS

#: The paper's noise injection for DDIM: ``x += alpha * x_T`` before each step with ``t < threshold``.
ALPHA = 0.003


def _temb(unet: Any, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    emb = unet.time_embedding(unet.time_proj(t).to(dtype))
    return unet.time_embed_act(emb) if getattr(unet, "time_embed_act", None) is not None else emb


def _down(
    unet: Any, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    emb = _temb(unet, t, x.dtype)
    h = unet.conv_in(x)
    res: tuple[torch.Tensor, ...] = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, r = block(hidden_states=h, temb=emb, encoder_hidden_states=text)
        else:
            h, r = block(hidden_states=h, temb=emb)
        res += tuple(r)
    h = unet.mid_block(h, emb, encoder_hidden_states=text)
    return h, res


def _up(unet: Any, h: torch.Tensor, res: tuple[torch.Tensor, ...], t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    emb = _temb(unet, t, h.dtype)
    for block in unet.up_blocks:
        n = len(block.resnets)
        res, mine = res[:-n], res[-n:]
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=mine, encoder_hidden_states=text)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=mine)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


@torch.inference_mode()
def authors_style_latents(
    sd: Any,
    prompt: str,
    latents: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    key_steps: Sequence[int] | None = None,
    negative_prompt: str | None = None,
) -> torch.Tensor:
    """Denoises one prompt the authors' way and returns the final latents.

    Args:
        sd: a diffusers ``StableDiffusionPipeline`` (its UNet, text encoder and scheduler are used).
        prompt: the prompt.
        latents: ``[B,C,h,w]`` unit initial noise.
        num_inference_steps: scheduler steps.
        guidance_scale: CFG weight (CFG always on here, as in the paper's runs).
        key_steps: the encoder's steps; the paper's list cut below the step count by default.
        negative_prompt: the unconditional prompt ("" by default).
    """
    device = latents.device
    unet = sd.unet
    scheduler = copy.deepcopy(sd.scheduler)
    scheduler.set_timesteps(num_inference_steps, device=device)
    ts = scheduler.timesteps
    keys = sorted(k for k in (key_steps if key_steps is not None else PAPER_KEY_STEPS) if k < len(ts))
    b = latents.shape[0]
    pos, neg = sd.encode_prompt(prompt, device, b, True, negative_prompt)
    text = torch.cat([neg, pos])
    x_t = latents.float()
    x = x_t * scheduler.init_noise_sigma
    half = 0.5 * scheduler.config.num_train_timesteps
    bounds = [*keys, len(ts)]
    for k, stop in zip(bounds[:-1], bounds[1:]):
        x_in = scheduler.scale_model_input(torch.cat([x, x]), ts[k])
        h, res = _down(unet, x_in, ts[k].float().expand(2 * b), text)
        s = stop - k
        # The authors' batching: the key step's features repeated once per step of the segment.
        rows_t = ts[k:stop].float().repeat_interleave(2 * b)
        eps_all = _up(
            unet, h.repeat(s, 1, 1, 1), tuple(r.repeat(s, 1, 1, 1) for r in res), rows_t, text.repeat(s, 1, 1)
        )
        for j, eps in zip(range(k, stop), eps_all.float().split(2 * b)):
            u, c = eps.chunk(2)
            eps = u + guidance_scale * (c - u)
            if ts[j] < half:
                x = x + ALPHA * x_t
            x = scheduler.step(eps, ts[j], x, return_dict=False)[0]
    return x


@torch.inference_mode()
def authors_style_images(sd: Any, prompt: str, latents: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """[`authors_style_latents()`][fd_trt.tools.authors_style.authors_style_latents], then the VAE and diffusers' post-processing (``np`` images)."""
    x = authors_style_latents(sd, prompt, latents, **kwargs)
    image = sd.vae.decode(x / sd.vae.config.scaling_factor, return_dict=False)[0]
    return x, sd.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * x.shape[0])


__all__ = ["authors_style_images", "authors_style_latents"]
