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

    @property
    def injects_noise(self) -> bool:
        """Whether prior noise injection is on by default (``noise_injection=None``): when some
        step decodes from propagated encoder features."""
        return self.propagates

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


#: The default exponent of ``power:K``: the best on average of 1, 1.5, 2 and 2.5 for DeepCache-like
#: decoder schedules on the default model, 3 prompts, K from 8 to 25 of 50 steps
#: (docs/guides/deepcache-front.md).
POWER_DEFAULT_EXPONENT = 1.5


def power_steps(count: int, num_steps: int, exponent: float = POWER_DEFAULT_EXPONENT) -> tuple[int, ...]:
    """``count`` steps placed at ``round(T * (i / count) ** exponent)``, ``i = 0 .. count-1``.

    An exponent above 1 puts them densely at the start of sampling, where a reused feature changes
    the result most (the paper's own key steps are dense there too); 1 is an even spread. Steps
    that round onto the one before move one step later, so there are always exactly ``count``.

    Raises:
        ScheduleError: for a count outside ``[1, num_steps]`` or an exponent that is not positive.
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= num_steps:
        raise ScheduleError(f"power:K needs K in [1, {num_steps}] (the run's steps), got {count!r}; e.g. power:12")
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not 0 < exponent <= 10:
        raise ScheduleError(f"power:K:P needs an exponent P in (0, 10], got {exponent!r}; e.g. power:12:2")
    steps: list[int] = []
    for i in range(count):
        at = int(round(num_steps * (i / count) ** exponent))
        at = max(at, steps[-1] + 1 if steps else 0)
        steps.append(min(at, num_steps - count + i))  # leave room for the steps still to place
    return tuple(steps)


def parse_schedule(spec: ScheduleSpec, num_steps: int) -> KeySchedule:
    """Turns a schedule spec into a validated [`KeySchedule`][fd_trt.core.schedule.KeySchedule].

    Args:
        spec: ``"paper"``, ``"all"``, ``"uniform:N"``, ``"power:K[:P]"`` (K steps dense at the start,
            [`power_steps()`][fd_trt.core.schedule.power_steps]), a comma-separated list such as ``"0,1,2,5"``,
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
        m = re.fullmatch(r"power:([^:\s]+)(?::(\S+))?", text)
        if m:
            try:
                count = int(m.group(1))
                exponent = float(m.group(2)) if m.group(2) is not None else POWER_DEFAULT_EXPONENT
            except ValueError:
                raise ScheduleError(
                    f"power:K[:P] needs an integer K and a number P, got {spec!r}; e.g. power:12 or power:12:2.5"
                ) from None
            return KeySchedule(power_steps(count, num_steps, exponent), num_steps)
        decoder = _parse_decoder_spec(spec, text, num_steps)
        if decoder is not None:
            return decoder
        if re.fullmatch(r"[\d\s,\[\]]+", text):
            items = [s for s in re.split(r"[\s,\[\]]+", text) if s]
            return KeySchedule(tuple(int(s) for s in items), num_steps)
        raise ScheduleError(
            f"unknown schedule {spec!r}: use 'paper', 'all', 'uniform:N', 'power:K[:P]', a list of step indices like '0,1,2,5', "
            "'deepcache:N' or 'combined:KEYS|FULL|DEPTH'"
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


@dataclass(frozen=True)
class DecoderSchedule(KeySchedule):
    """Key steps plus, per step, how much of the decoder runs (docs/guides/deepcache-front.md).

    A step's depth is 0 when it runs the whole decoder: key steps always, and the steps between
    that decode from their key step's propagated features (encoder propagation). A depth ``k > 0``
    makes the step a shallow one: it recomputes only the decoder's last ``k`` up layers (one up
    layer is one up-block resnet with its attention), and reuses the hidden state that entered
    them at the last earlier step that ran the whole decoder (DeepCache's observation: the deep
    part of the up path changes slowly too).

    The shallow layers read skips ``0 .. k-1``. With ``fresh_input`` (DeepCache's branch 0, only
    ``k = 1``) a shallow step recomputes ``skip_00``, the ``conv_in`` output, from its own
    latents, so shallow steps run one at a time; without it they read the key step's skips, so a
    segment's shallow steps depend only on cached features and are decoded together.

    Args:
        key_steps, num_steps: as [`KeySchedule`][fd_trt.core.schedule.KeySchedule].
        depths: one per step: 0 (whole decoder) or the shallow depth; 0 at every key step.
        fresh_input: shallow steps recompute ``skip_00`` from their own latents.
    """

    depths: tuple[int, ...] = ()
    fresh_input: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.depths) != self.num_steps:
            raise ScheduleError(
                f"a decoder schedule needs one depth per step: {len(self.depths)} depths for {self.num_steps} steps"
            )
        for d in self.depths:
            if isinstance(d, bool) or not isinstance(d, int) or d < 0:
                raise ScheduleError(
                    f"decoder depths must be integers >= 0 (0: the whole decoder), got {d!r} in {_show(self.depths)}"
                )
        keyed = [k for k in self.key_steps if self.depths[k]]
        if keyed:
            raise ScheduleError(
                f"key steps {_show(keyed)} have shallow depths: a key step runs the whole decoder (depth 0)"
            )
        if self.fresh_input and any(d > 1 for d in self.depths):
            raise ScheduleError(
                "fresh_input (DeepCache's branch 0) recomputes only conv_in: it needs shallow depth 1, got "
                f"{sorted({d for d in self.depths if d > 1})}; drop fresh_input for deeper shallow steps"
            )

    @property
    def injects_noise(self) -> bool:
        """With ``fresh_input`` (DeepCache's branch 0) only the whole-decoder steps between key
        steps decode from propagated encoder features: noise injection is on by default only when
        there are some. Measured on the default model (docs/guides/deepcache-front.md): injecting
        noise into DeepCache-like schedules only moved them away from diffusers (``deepcache:2``
        rel. L2 0.050 without, 0.074 with), as DeepCache itself injects none."""
        if not self.fresh_input:
            return self.propagates
        keys = set(self.key_steps)
        return any(d == 0 and i not in keys for i, d in enumerate(self.depths))

    @property
    def shallow_steps(self) -> tuple[int, ...]:
        """The steps that run only the decoder's shallow end."""
        return tuple(i for i, d in enumerate(self.depths) if d)

    @property
    def full_steps(self) -> tuple[int, ...]:
        """The steps that run the whole decoder (key steps included)."""
        return tuple(i for i, d in enumerate(self.depths) if not d)

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)

    @property
    def spec(self) -> str:
        """The schedule as a string [`parse_schedule()`][fd_trt.core.schedule.parse_schedule] reads back (``combined:...``)."""
        full = [i for i in self.full_steps if i not in set(self.key_steps)]
        depth = sorted({d for d in self.depths if d})
        if len(depth) > 1:  # mixed depths have no string form
            return f"combined:{list(self.key_steps)} depths {list(self.depths)}"
        return (
            f"combined:{','.join(map(str, self.key_steps))}|{','.join(map(str, full)) or 'none'}"
            f"|{depth[0] if depth else 1}" + ("|fresh" if self.fresh_input else "")
        )


def with_keys(schedule: KeySchedule, key_steps: tuple[int, ...]) -> KeySchedule:
    """``schedule`` with other key steps (a ControlNet guidance window's edges added); a
    [`DecoderSchedule`][fd_trt.core.schedule.DecoderSchedule] keeps its depths, with the new key steps running the whole decoder."""
    if isinstance(schedule, DecoderSchedule):
        keys = set(key_steps)
        depths = tuple(0 if i in keys else d for i, d in enumerate(schedule.depths))
        return DecoderSchedule(tuple(key_steps), schedule.num_steps, depths, schedule.fresh_input)
    return KeySchedule(tuple(key_steps), schedule.num_steps)


def combined_schedule(
    key_steps: ScheduleSpec,
    full_steps: ScheduleSpec | None,
    depth: int,
    num_steps: int,
    *,
    fresh_input: bool = False,
) -> DecoderSchedule:
    """Key steps, the other steps that run the whole decoder, and the shallow depth of the rest.

    Args:
        key_steps: any [`parse_schedule()`][fd_trt.core.schedule.parse_schedule] spec: where the encoder runs.
        full_steps: a spec of steps that run the whole decoder from propagated features (key
            steps do anyway); ``None`` or ``"none"``: only the key steps. ``"all"`` gives plain
            encoder propagation, with no shallow step.
        depth: the decoder's last up layers a shallow step recomputes (1 = DeepCache's branch 0).
        num_steps: the run's steps.
        fresh_input: shallow steps recompute ``skip_00`` from their own latents (DeepCache).
    """
    keys = parse_schedule(key_steps, num_steps).key_steps
    if full_steps is None or (isinstance(full_steps, str) and full_steps.strip().lower() in ("none", "")):
        full: set[int] = set()
    elif isinstance(full_steps, str) and re.fullmatch(r"[\d\s,\[\]]+", full_steps.strip()):
        full = {_as_index(int(x)) for x in re.split(r"[\s,\[\]]+", full_steps.strip()) if x}
        bad = sorted(i for i in full if not 0 <= i < num_steps)
        if bad:
            raise ScheduleError(f"full-decoder steps {_show(bad)} are out of range for {num_steps} steps")
    else:
        full = set(parse_schedule(full_steps, num_steps).key_steps)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ScheduleError(f"the shallow depth must be a positive integer, got {depth!r}; e.g. 1")
    full |= set(keys)
    depths = tuple(0 if i in full else depth for i in range(num_steps))
    return DecoderSchedule(keys, num_steps, depths, fresh_input)


def _parse_decoder_spec(spec: str, text: str, num_steps: int) -> DecoderSchedule | None:
    """``deepcache:N`` and ``combined:KEYS|FULL|DEPTH[|fresh]``; ``None`` for other strings."""
    m = re.fullmatch(r"deepcache:(\S+)", text)
    if m:
        try:
            n = int(m.group(1))
        except ValueError:
            n = 0
        if n <= 0:
            raise ScheduleError(f"deepcache:N needs a positive integer interval N, got {spec!r}; e.g. deepcache:3")
        return combined_schedule(f"uniform:{n}", None, 1, num_steps, fresh_input=True)
    if text.startswith("combined:"):
        parts = [p.strip() for p in text[len("combined:") :].split("|")]
        fresh = len(parts) == 4 and parts[3] == "fresh"
        if len(parts) not in (3, 4) or (len(parts) == 4 and not fresh) or not parts[2].isdigit():
            raise ScheduleError(
                f"bad combined schedule {spec!r}: use combined:KEYS|FULL|DEPTH[|fresh], e.g. "
                "'combined:paper|uniform:2|1' (key steps, steps that run the whole decoder or 'none', "
                "the shallow depth)"
            )
        return combined_schedule(parts[0], parts[1], int(parts[2]), num_steps, fresh_input=fresh)
    return None


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
