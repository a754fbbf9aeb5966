"""Which key steps a call uses: ``schedule=`` resolved against saved calibrations, as a pipeline mixin.

``schedule="calibrated"`` (and ``None``, when a matching calibration is saved) looks for a
calibration ([`fd_trt.core.calibration`][fd_trt.core.calibration]) in the engine directory, then the model folder; a
calibration must be for the pipeline's UNet weights, scheduler and step count.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fd_trt.core.schedule import KeySchedule, NoiseInjection, parse_schedule

logger = logging.getLogger(__name__)


class KeyStepsMixin:
    """``calibration_folders``, ``resolve_schedule`` and ``prepare_schedule`` of a pipeline.

    It reads the pipeline's ``sd`` (its scheduler), ``engines``, ``model_dir`` and ``unet_sha256``.
    """

    sd: Any
    engines: Path | None
    model_dir: Path | None
    unet_sha256: str

    def calibration_folders(self) -> list[Path]:
        """Where ``schedule="calibrated"`` looks: the engine directory, then the model folder."""
        return [f for f in (self.engines, self.model_dir) if f is not None]

    def resolve_schedule(self, schedule: Any, num_inference_steps: int, scheduler: str | None = None) -> Any:
        """Turns ``None``, ``"calibrated"``, a calibration path or object into key steps.

        Other specs are returned unchanged for [`fd_trt.core.schedule.parse_schedule()`][fd_trt.core.schedule.parse_schedule].

        Args:
            schedule: the call's ``schedule``.
            num_inference_steps: the call's step count.
            scheduler: the scheduler's short name; the pipeline's current scheduler by default.

        Raises:
            ScheduleError: when no calibration matches, or one was made for another model,
                scheduler or step count.
        """
        from fd_trt.core.calibration import Calibration, find_calibration
        from fd_trt.errors import ScheduleError
        from fd_trt.families.models import scheduler_name

        name = scheduler or scheduler_name(self.sd.scheduler)
        if schedule is None or (isinstance(schedule, str) and schedule.strip().lower() == "calibrated"):
            path = find_calibration(self.calibration_folders(), name, num_inference_steps) if name else None
            if path is None:
                if schedule is None:
                    return "paper"
                where = ", ".join(str(f) for f in self.calibration_folders()) or "no model folder or engine directory"
                raise ScheduleError(
                    f"schedule='calibrated' but no calibration for {name or type(self.sd.scheduler).__name__}-"
                    f"{num_inference_steps} is saved in {where}: run fd-trt calibrate --model MODEL --scheduler "
                    f"{name or 'ddim'} --steps {num_inference_steps} --key-steps 9 --save, or pass a calibration "
                    "JSON path as schedule"
                )
            cal = Calibration.load(path)
            if schedule is None:
                try:
                    cal.check(model_sha256=self.unet_sha256, scheduler=name, steps=num_inference_steps, where=str(path))
                except ScheduleError as exc:
                    logger.info("not using the saved calibration: %s", exc)
                    return "paper"
                return cal.schedule() if cal.depths is not None else list(cal.key_steps)
            schedule = cal
        elif isinstance(schedule, (str, os.PathLike)) and str(schedule).lower().endswith(".json"):
            schedule = Calibration.load(schedule)
        if isinstance(schedule, Calibration):
            schedule.check(model_sha256=self.unet_sha256, scheduler=name, steps=num_inference_steps)
            return schedule.schedule() if schedule.depths is not None else list(schedule.key_steps)
        return schedule

    def prepare_schedule(
        self, schedule: Any, noise_injection: bool | NoiseInjection | None, num_inference_steps: int, num_steps: int
    ) -> tuple[KeySchedule, NoiseInjection]:
        """The call's key steps and noise-injection policy (see ``__call__`` for the arguments)."""
        key_schedule: KeySchedule = parse_schedule(self.resolve_schedule(schedule, num_inference_steps), num_steps)
        if isinstance(noise_injection, NoiseInjection):
            return key_schedule, noise_injection
        enabled = key_schedule.injects_noise if noise_injection is None else bool(noise_injection)
        return key_schedule, NoiseInjection(enabled=enabled)


__all__ = ["KeyStepsMixin"]
