"""Which pipeline class serves which model family ([`fd_trt.families`][fd_trt.families]).

`PIPELINE_CLASSES` maps a family's name to the class that ``FasterDiffusionPipeline.from_pretrained``
and ``from_diffusers`` return for its models, as diffusers' ``AUTO_TEXT2IMAGE_PIPELINES_MAPPING``
maps model names to pipeline classes. ``fd_trt.pipelines`` registers ``"sd"`` ->
``FasterDiffusionPipeline`` and ``"sdxl"`` -> ``FasterDiffusionXLPipeline``. A family with no
entry runs on ``FasterDiffusionPipeline``, which asks the family for its shapes, refusals and
prompt encoding; a family that needs call arguments of its own (as SDXL's second prompt)
registers a subclass here.

This module imports no pipeline: the classes register themselves into it.
"""

from __future__ import annotations

from collections import OrderedDict

from fd_trt.errors import InputError

#: Family name -> the pipeline class that serves it.
PIPELINE_CLASSES: OrderedDict[str, type] = OrderedDict()


def register_pipeline_class(family: str, cls: type) -> type:
    """Makes ``cls`` the class that serves the models of ``family`` (a family's name).

    Returns:
        ``cls``.

    Raises:
        InputError: when the family already has a class, or ``cls`` is not a class.
    """
    if not isinstance(cls, type):
        raise InputError(f"register_pipeline_class takes a pipeline class, got {cls!r}")
    if family in PIPELINE_CLASSES:
        raise InputError(
            f"the model family {family!r} is served by {PIPELINE_CLASSES[family].__name__} already: "
            f"unregister_pipeline_class({family!r}) first"
        )
    PIPELINE_CLASSES[family] = cls
    return cls


def unregister_pipeline_class(family: str) -> type:
    """Removes the class registered for ``family`` and returns it.

    Raises:
        InputError: when none is registered.
    """
    if family not in PIPELINE_CLASSES:
        raise InputError(f"no pipeline class is registered for the model family {family!r}")
    return PIPELINE_CLASSES.pop(family)


def pipeline_class_for(family: str) -> type | None:
    """The class registered for a family's name, ``None`` when there is none."""
    return PIPELINE_CLASSES.get(family)


__all__ = ["PIPELINE_CLASSES", "pipeline_class_for", "register_pipeline_class", "unregister_pipeline_class"]
