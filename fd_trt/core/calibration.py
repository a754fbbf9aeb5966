"""Calibrated key steps as saved files: what [`fd_trt.tools.calibrate.calibrate()`][fd_trt.tools.calibrate.calibrate] writes and
``schedule="calibrated"`` reads.

The search itself lives in [`fd_trt.tools.calibrate`][fd_trt.tools.calibrate]; this module is the file format, which
the pipeline needs without the search.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fd_trt.core.schedule import DecoderSchedule, KeySchedule
from fd_trt.errors import ScheduleError
from fd_trt.utils.files import write_atomic

#: Folder, inside a model folder or an engine directory, that holds saved calibrations.
CALIBRATION_DIR = "calibrations"


@dataclass
class Calibration:
    """Key steps chosen for one model, scheduler and step count.

    Attributes:
        key_steps: sorted, unique, starting with 0.
        scheduler: the scheduler's short name (``ddim``, ``dpmpp``, ...).
        steps: the number of inference steps.
        model_sha256: the UNet weights hash it was calibrated on.
        error: relative L2 of the final latents against ``all`` on the calibration batch.
        method: the search method.
        prompts: the calibration prompts.
        seeds: their seeds (one per prompt).
        guidance: the CFG scale used.
        seconds: how long the calibration took.
        estimated_speedup: UNet-time speedup over ``all`` estimated from measured encoder and
            decoder costs, or ``None``.
        paper_error: the same error for ``paper`` with the same K budget cut, for comparison.
        costs: the encoder and decoder call costs (seconds) measured on the backend that
            ``estimated_speedup`` comes from (`measure_costs()`, `estimate_speedup()`).
        split: for a diffusion transformer, the split point N calibrated with the key steps.
        depths: a decoder schedule's per-step decoder depths (0: the whole decoder; ``k``: its
            last ``k`` up layers, see [`DecoderSchedule`][fd_trt.core.schedule.DecoderSchedule]); ``None``
            for key steps alone (files written before decoder schedules).
        fresh_input: the decoder schedule's shallow steps read their own latents' ``conv_in``.
        image_size: ``[height, width]`` it was calibrated at, when a size was asked for (``None``: the
            model's own size).
    """

    key_steps: list[int]
    scheduler: str
    steps: int
    model_sha256: str
    error: float
    method: str
    prompts: list[str]
    seeds: list[int]
    guidance: float = 7.5
    seconds: float = 0.0
    estimated_speedup: float | None = None
    paper_error: float | None = None
    evaluations: int = 0
    steps_run: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    costs: dict[str, float] | None = None
    #: A diffusion transformer's split point N (the blocks its encoder runs); ``None`` for UNets.
    split: int | None = None
    depths: list[int] | None = None
    fresh_input: bool = False
    #: ``[height, width]`` calibrated at, when a size was asked for (``fd-trt calibrate --height``).
    image_size: list[int] | None = None

    def to_json(self) -> str:
        data = asdict(self)
        for name in ("split", "image_size"):  # calibrations without them keep the fields they always had
            if data[name] is None:
                del data[name]
        return json.dumps(data, indent=2)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the calibration as JSON (atomically) and returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Reads a calibration JSON written by [`save()`][fd_trt.core.calibration.Calibration.save] or ``fd-trt calibrate --out``.

        Raises:
            ScheduleError: for a missing or malformed file.
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ScheduleError(
                f"calibration file {path} does not exist: write one with fd-trt calibrate --out {path}"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ScheduleError(
                f"calibration file {path} is not valid JSON ({exc}): recreate it with fd-trt calibrate"
            ) from None
        if not isinstance(raw, dict):
            raise ScheduleError(f"calibration file {path} holds {type(raw).__name__}, not a calibration object")
        try:
            cal = cls(**raw)
        except TypeError as exc:
            raise ScheduleError(
                f"calibration file {path} has missing or unknown fields ({exc}): recreate it with fd-trt calibrate"
            ) from None
        try:
            cal.schedule()  # validates
        except ScheduleError as exc:
            raise ScheduleError(f"calibration file {path}: {exc}; recreate it with fd-trt calibrate") from None
        return cal

    def check(self, *, model_sha256: str | None, scheduler: str | None, steps: int, where: str = "") -> None:
        """Refuses a calibration made for another model, scheduler or step count.

        Raises:
            ScheduleError: naming what differs and the command that recalibrates.
        """
        problems = []
        if steps != self.steps:
            problems.append(f"{self.steps} steps, but the run has {steps}")
        if scheduler is not None and scheduler != self.scheduler:
            problems.append(f"scheduler {self.scheduler}, but the run uses {scheduler}")
        if model_sha256 is not None and model_sha256 != self.model_sha256:
            problems.append(f"UNet weights {self.model_sha256[:12]}.., but this UNet's are {model_sha256[:12]}..")
        if problems:
            raise ScheduleError(
                f"calibration {where or ''} was made for {' and '.join(problems)}: recalibrate with "
                f"fd-trt calibrate --model MODEL --scheduler {scheduler or self.scheduler} --steps {steps} --save"
            )

    def schedule(self) -> KeySchedule:
        """The key steps, or the [`DecoderSchedule`][fd_trt.core.schedule.DecoderSchedule] when ``depths`` is set."""
        keys = tuple(int(k) for k in self.key_steps)
        if self.depths is not None:
            return DecoderSchedule(keys, int(self.steps), tuple(int(d) for d in self.depths), bool(self.fresh_input))
        return KeySchedule(keys, int(self.steps))


def calibration_file(folder: str | os.PathLike[str], scheduler: str, steps: int) -> Path:
    """Where a calibration for ``scheduler`` and ``steps`` is saved inside a model or engine folder."""
    return Path(folder) / CALIBRATION_DIR / f"{scheduler}-{int(steps)}.json"


def find_calibration(folders: Sequence[str | os.PathLike[str] | None], scheduler: str, steps: int) -> Path | None:
    """The first saved calibration for ``scheduler`` and ``steps`` in ``folders``, or ``None``."""
    for folder in folders:
        if folder is None:
            continue
        path = calibration_file(folder, scheduler, steps)
        if path.is_file():
            return path
    return None
