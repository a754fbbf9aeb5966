"""Checks of a call's arguments, each error naming the bad value and the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fd_trt.errors import InputError

OUTPUT_TYPES = ("pil", "np", "latent")


def check_call_inputs(
    prompt: Any,
    negative_prompt: Any,
    height: Any,
    width: Any,
    num_inference_steps: Any,
    guidance_scale: Any,
    num_images_per_prompt: Any,
    output_type: Any,
    f: int,
) -> list[str]:
    """Validates a call's arguments (``f`` is the VAE factor the size must divide by) and returns
    the prompts as a list.

    Raises:
        InputError: naming the bad value and what is expected.
    """
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise InputError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    if negative_prompt is not None:
        if isinstance(negative_prompt, (list, tuple)):
            if len(negative_prompt) != len(prompts):
                raise InputError(
                    f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts: give one negative "
                    "prompt per prompt, or a single string for all"
                )
            if not all(isinstance(p, str) for p in negative_prompt):
                raise InputError(f"negative prompts must be strings, got {negative_prompt!r}")
        elif not isinstance(negative_prompt, str):
            raise InputError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
        if v % f != 0:
            raise InputError(
                f"{name}={v} is not divisible by the VAE factor {f}: use a multiple of {f}, e.g. {max(f, v // f * f)}"
            )
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
        raise InputError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, (int, float))
        or not math.isfinite(guidance_scale)
    ):
        raise InputError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if (
        isinstance(num_images_per_prompt, bool)
        or not isinstance(num_images_per_prompt, int)
        or num_images_per_prompt <= 0
    ):
        raise InputError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    return prompts


def check_call_options(guidance_rescale: Any, tensor_inputs: Sequence[str], generator: Any, batch: int) -> None:
    """Checks the call arguments that ``check_inputs`` leaves to the base pipeline.

    Raises:
        InputError: for a ``guidance_rescale`` outside [0, 1], callback tensor inputs other than
            ``latents``, or a generator list whose length is not the batch.
    """
    if (
        isinstance(guidance_rescale, bool)
        or not isinstance(guidance_rescale, (int, float))
        or not (math.isfinite(guidance_rescale) and 0.0 <= guidance_rescale <= 1.0)
    ):
        raise InputError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
    bad_keys = [k for k in tensor_inputs if k != "latents"]
    if bad_keys:
        raise InputError(f"callback_on_step_end_tensor_inputs supports only 'latents', got {bad_keys}")
    if isinstance(generator, list) and len(generator) != batch:
        raise InputError(f"{len(generator)} generators for {batch} images: pass one generator per image, or one")


__all__ = ["OUTPUT_TYPES", "InputChecksMixin", "check_call_inputs", "check_call_options"]


class InputChecksMixin:
    """``check_inputs`` for [`FasterDiffusionPipeline`][fd_trt.pipelines.pipeline.FasterDiffusionPipeline]: the
    call's common arguments ([`check_call_inputs()`][fd_trt.pipelines.inputs.check_call_inputs]), then the model family's own."""

    vae_scale_factor: int
    family: Any

    def check_inputs(
        self,
        prompt: Any,
        negative_prompt: Any,
        height: Any,
        width: Any,
        num_inference_steps: Any,
        guidance_scale: Any,
        num_images_per_prompt: Any,
        output_type: Any,
        **prompt_options: Any,
    ) -> list[str]:
        """Validates the call's arguments and returns the prompts as a list ([`check_call_inputs()`][fd_trt.pipelines.inputs.check_call_inputs]).
        ``prompt_options`` are the model family's own (SDXL's second prompts and micro-conditioning),
        checked by it ([`check_prompt_options()`][fd_trt.families.base.ModelFamily.check_prompt_options]).

        Raises:
            InputError: naming the bad value and what is expected.
        """
        prompts = check_call_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            output_type,
            self.vae_scale_factor,
        )
        self.family.check_prompt_options(prompts, **prompt_options)
        return prompts
