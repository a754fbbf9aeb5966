"""Key-step schedules, segments and the noise-injection policy (docs/design.md section 1).

A schedule marks the key steps: the step indices at which the encoder runs. Each key step opens
a segment that lasts until the next key step (or the end); every step of a segment reuses the
encoder features of its key step.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from fd_trt.errors import ScheduleError

#: The paper's key steps for DDIM-50 on Stable Diffusion (utils_sd.py, mod "50ls").
PAPER_KEY_STEPS: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 15, 25, 35)

ScheduleSpec = Union[str, Sequence[int], "KeySchedule"]


@dataclass(frozen=True)
class Segment:
    """Steps ``start .. stop-1``; ``start`` is the key step whose encoder features they share."""

    start: int
    stop: int

    @property
    def steps(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class KeySchedule:
    """A validated set of key steps for ``num_steps`` scheduler steps.

    Args:
        key_steps: sorted, unique step indices, starting with 0, all below ``num_steps``.
        num_steps: the number of scheduler steps (``len(scheduler.timesteps)``).
    """

    key_steps: tuple[int, ...]
    num_steps: int

    def __post_init__(self) -> None:
        _validate(self.key_steps, self.num_steps)

    @property
    def segments(self) -> tuple[Segment, ...]:
        bounds = list(self.key_steps) + [self.num_steps]
        return tuple(Segment(a, b) for a, b in zip(bounds[:-1], bounds[1:]))

    @property
    def max_segment_len(self) -> int:
        return max(len(s) for s in self.segments)

    @property
    def propagates(self) -> bool:
        """True when some step reuses features of an earlier key step."""
        return len(self.key_steps) < self.num_steps

    def __len__(self) -> int:
        return len(self.key_steps)


def _show(key_steps: Sequence[int], limit: int = 12) -> str:
    """The schedule for an error message, shortened: a 200,000-item list must not become the message."""
    items = list(key_steps[:limit])
    more = len(key_steps) - len(items)
    return f"{items}"[:-1] + (f", ... ({more} more)]" if more > 0 else "]")


def _validate(key_steps: Sequence[int], num_steps: int) -> None:
    # One pass, O(n): servers validate untrusted lists, and a quadratic check on a long list blocks them.
    if not isinstance(num_steps, int) or num_steps <= 0:
        raise ScheduleError(f"the number of steps must be a positive integer, got {num_steps!r}")
    if len(key_steps) == 0:
        raise ScheduleError("a schedule needs at least one key step; step 0 must be one of them")
    for k in key_steps:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ScheduleError(f"key steps must be integers, got {k!r} in {_show(key_steps)}")
    if len(key_steps) > num_steps:
        raise ScheduleError(
            f"schedule has {len(key_steps)} key steps but the run has only {num_steps} steps: "
            f"give at most {num_steps} distinct indices in [0, {num_steps - 1}]"
        )
    seen: set[int] = set()
    bad: list[int] = []
    dups: set[int] = set()
    for k in key_steps:
        if k < 0 or k >= num_steps:
            bad.append(k)
        if k in seen:
            dups.add(k)
        seen.add(k)
    if 0 not in seen:
        raise ScheduleError(
            f"schedule {_show(key_steps)} has no step 0: the encoder must run at the first step. Add 0 to the list."
        )
    if bad:
        raise ScheduleError(
            f"key steps {_show(bad)} are out of range for {num_steps} steps: use indices in [0, {num_steps - 1}]"
        )
    if dups:
        raise ScheduleError(
            f"schedule {_show(key_steps)} repeats step(s) {_show(sorted(dups))}: give each key step once"
        )
    if any(a > b for a, b in zip(key_steps, key_steps[1:])):
        raise ScheduleError(
            f"schedule {_show(key_steps)} is not sorted: give the key steps in increasing order, "
            f"e.g. {_show(sorted(key_steps))}"
        )


def parse_schedule(spec: ScheduleSpec, num_steps: int) -> KeySchedule:
    """Turns a schedule spec into a validated [`KeySchedule`][fd_trt.core.schedule.KeySchedule].

    Args:
        spec: ``"paper"``, ``"all"``, ``"uniform:N"``, a comma-separated list such as ``"0,1,2,5"``,
            a sequence of step indices, or a [`KeySchedule`][fd_trt.core.schedule.KeySchedule] (checked against ``num_steps``).
        num_steps: the number of scheduler steps, ``len(scheduler.timesteps)``.

    Returns:
        The key schedule.

    Raises:
        ScheduleError: for an unknown name, a bad ``N``, or a list without 0, out of range,
            unsorted or with duplicates.
    """
    if isinstance(spec, KeySchedule):
        if spec.num_steps != num_steps:
            raise ScheduleError(
                f"schedule was built for {spec.num_steps} steps but the run has {num_steps}: "
                "rebuild it with parse_schedule(spec, num_steps)"
            )
        return spec
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
        raise ScheduleError(f"the number of steps must be a positive integer, got {num_steps!r}")
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "paper":
            return KeySchedule(tuple(k for k in PAPER_KEY_STEPS if k < num_steps), num_steps)
        if text == "all":
            return KeySchedule(tuple(range(num_steps)), num_steps)
        m = re.fullmatch(r"uniform:(\S+)", text)
        if m:
            try:
                n = int(m.group(1))
            except ValueError:
                n = 0
            if n <= 0:
                raise ScheduleError(f"uniform:N needs a positive integer N, got {spec!r}; e.g. uniform:5")
            return KeySchedule(tuple(range(0, num_steps, n)), num_steps)
        if re.fullmatch(r"[\d\s,\[\]]+", text):
            items = [s for s in re.split(r"[\s,\[\]]+", text) if s]
            return KeySchedule(tuple(int(s) for s in items), num_steps)
        raise ScheduleError(
            f"unknown schedule {spec!r}: use 'paper', 'all', 'uniform:N' or a list of step indices like '0,1,2,5'"
        )
    try:
        steps = tuple(spec)
    except TypeError:
        raise ScheduleError(
            f"a schedule must be a name or a list of step indices, got {type(spec).__name__} {spec!r}"
        ) from None
    if len(steps) > num_steps:  # before touching the items: an untrusted list may be huge
        raise ScheduleError(
            f"schedule has {len(steps)} key steps but the run has only {num_steps} steps: "
            f"give at most {num_steps} distinct indices in [0, {num_steps - 1}]"
        )
    return KeySchedule(tuple(_as_index(k) for k in steps), num_steps)


def _as_index(k: object) -> int:
    if isinstance(k, bool):
        raise ScheduleError(f"key steps must be integers, got {k!r}")
    try:
        return operator.index(k)  # type: ignore[arg-type]
    except TypeError:
        raise ScheduleError(f"key steps must be integers, got {k!r} ({type(k).__name__})") from None


@dataclass(frozen=True)
class NoiseInjection:
    """Prior noise injection: ``x += alpha * x_T`` before each scheduler step with ``tau < fraction * T_train``.

    Args:
        enabled: whether injection runs at all.
        alpha: the weight of the initial latent ``x_T``; the paper uses 0.003.
        threshold_fraction: injection applies when ``timestep < threshold_fraction * num_train_timesteps``.
    """

    enabled: bool = True
    alpha: float = 0.003
    threshold_fraction: float = 0.5

    def applies(self, timestep: float, num_train_timesteps: int) -> bool:
        return self.enabled and float(timestep) < self.threshold_fraction * num_train_timesteps
