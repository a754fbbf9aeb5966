"""``backend="auto"``: choose the backend and the decoder call size by measuring them.

As TensorRT times tactics, the tuner times what can run here: each candidate runner's encoder call
at the run's rows, and its decoder call at every step count a segment may be decoded in. From
those costs it predicts a run of the schedule at hand for each candidate and each decoder call
size (how many of a segment's steps go into one call), and keeps the fastest. Batching does not
always pay: ONNX Runtime's decoder costs as much per step in one call of 20 rows as in ten calls
of 2 on some CPUs, while eager PyTorch gains a lot from it.

The decision is cached as JSON in the engine cache (``$FD_TRT_CACHE/tuning``), keyed by the UNet
weights hash, the shapes, the rows, the schedule, the device, the thread count, the library
versions and the candidates that were available, and reused on later runs.

Candidates (all exact unless ``precision="auto"`` asks for reduced precision):

* CPU: ``torch`` fp32; ``onnxruntime`` fp32 when its graphs are already built (``auto`` never
  exports graphs by surprise; ``fd-trt build --tune`` builds and measures them ahead of time);
  ``torch`` bf16 with ``precision="auto"``.
* CUDA: ``tensorrt`` when importable and its graphs and plans are built, then ``torch`` fp16 with
  CUDA graphs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fd_trt.core.features import Added, Features
from fd_trt.core.runner import Runner
from fd_trt.errors import FdTrtError, InputError
from fd_trt.utils.files import write_atomic

logger = logging.getLogger(__name__)

TUNING_FORMAT = 1
#: Timed rounds over the measured shapes, after one untimed call each; the median is kept.
DEFAULT_REPEATS = 3
#: A timed round over a candidate's shapes that takes at least this long is its last: calls of
#: seconds each vary little from round to round, and on sd15-arch at 256x256 three rounds of
#: three candidates made the first call tune for 477 s.
ROUND_BUDGET_S = 10.0
#: Predicted times within this fraction of the best count as a tie, broken toward larger calls.
TIE = 0.03


@dataclass(frozen=True)
class Candidate:
    """One way to run the UNet: a backend at a precision, with runner options.

    Attributes:
        backend: ``torch``, ``onnxruntime`` or ``tensorrt``.
        precision: ``fp32``, ``fp16`` or ``bf16``.
        exact: whether it computes in the precision of the reference (fp32 on CPU; the CUDA
            candidates are all fp16).
        options: runner options, as sorted ``(name, value)`` pairs.
    """

    backend: str
    precision: str
    exact: bool = True
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        opts = "".join(f"+{k}" for k, v in self.options if v is True)
        return f"{self.backend}/{self.precision}{opts}"


@dataclass
class CostTable:
    """Measured seconds of one candidate at one row count per step.

    Attributes:
        encoder_s: one encoder call at ``rows`` rows.
        decoder_s: one decoder call per step count (``{steps: seconds}``; ``steps * rows`` rows).
    """

    encoder_s: float
    decoder_s: dict[int, float] = field(default_factory=dict)

    def decoder(self, steps: int) -> float:
        """Seconds of one decoder call of ``steps`` steps; linear between measured step counts."""
        if steps <= 0:
            return 0.0
        if steps in self.decoder_s:
            return self.decoder_s[steps]
        known = sorted(self.decoder_s)
        if not known:
            raise FdTrtError("no decoder cost measured")
        lo = max([k for k in known if k < steps], default=None)
        hi = min([k for k in known if k > steps], default=None)
        if lo is None:
            assert hi is not None
            return self.decoder_s[hi] * steps / hi
        if hi is None:
            return self.decoder_s[lo] * steps / lo
        f = (steps - lo) / (hi - lo)
        return self.decoder_s[lo] + f * (self.decoder_s[hi] - self.decoder_s[lo])


def predict_seconds(costs: CostTable, segment_lengths: Sequence[int], steps_per_call: int) -> float:
    """UNet seconds of one run: one encoder call per segment, decoder calls of ``steps_per_call`` steps.

    Args:
        costs: the candidate's measured costs.
        segment_lengths: the schedule's segment lengths.
        steps_per_call: decoder call size in steps (the last call of a segment takes the rest).
    """
    total = 0.0
    for n in segment_lengths:
        c = min(steps_per_call, n)
        full, rest = divmod(n, c)
        total += costs.encoder_s + full * costs.decoder(c) + costs.decoder(rest)
    return total


def call_sizes(segment_lengths: Sequence[int], parallel: bool = True, max_steps: int | None = None) -> list[int]:
    """Decoder call sizes (in steps) worth trying: 1 and every segment length, under the cap."""
    if not parallel:
        return [1]
    sizes = {1, *segment_lengths}
    if max_steps is not None:
        sizes = {s for s in sizes if s <= max_steps} or {1}
    return sorted(sizes)


def measured_sizes(segment_lengths: Sequence[int], parallel: bool = True, max_steps: int | None = None) -> list[int]:
    """Decoder step counts to time: powers of two up to the largest call size, and that size.

    Other sizes are interpolated ([`CostTable.decoder()`][fd_trt.backends.auto.CostTable.decoder]): a call's cost is close to linear
    in its rows, and timing every segment length would cost up to twice as much.
    """
    top = max(call_sizes(segment_lengths, parallel, max_steps))
    sizes = {top}
    p = 1
    while p < top:
        sizes.add(p)
        p *= 2
    return sorted(sizes)


@dataclass
class Decision:
    """What ``auto`` chose for one model, shape, row count and schedule, and why.

    Attributes:
        backend, precision: the chosen candidate.
        options: its runner options.
        steps_per_call: decoder call size in steps; ``None`` for a whole segment per call.
        predicted_s: predicted UNet seconds per run of the chosen candidate.
        table: one entry per candidate: ``label``, ``predicted_s``, ``steps_per_call``, and
            ``skipped`` (why it was not measured) where it was not.
        key: the cache key fields.
        tuning_s: seconds spent measuring (0 when read from the cache).
        cached: whether it was read from the cache.
    """

    backend: str
    precision: str
    options: dict[str, Any]
    steps_per_call: int | None
    predicted_s: float
    table: list[dict[str, Any]]
    key: dict[str, Any]
    tuning_s: float = 0.0
    cached: bool = False

    @property
    def label(self) -> str:
        return Candidate(self.backend, self.precision, options=tuple(sorted(self.options.items()))).label

    def summary(self) -> str:
        """One line: the choice and the predicted UNet time of each candidate."""
        parts = []
        for row in self.table:
            if row.get("skipped"):
                parts.append(f"{row['label']} not measured ({row['skipped']})")
            else:
                spc = row["steps_per_call"]
                parts.append(
                    f"{row['label']} {row['predicted_s']:.3f} s ({'whole segments' if spc is None else f'{spc} steps/call'})"
                )
        how = "cached decision" if self.cached else f"tuned in {self.tuning_s:.2f} s"
        return f"auto chose {self.label} ({how}); predicted UNet time per image: " + "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose(
    costs: dict[Candidate, CostTable],
    segment_lengths: Sequence[int],
    *,
    parallel: bool = True,
    max_steps: int | None = None,
    skipped: dict[Candidate, str] | None = None,
    key: dict[str, Any] | None = None,
) -> Decision:
    """Picks the candidate and decoder call size with the least predicted time.

    Args:
        costs: measured costs per candidate.
        segment_lengths: the schedule's segment lengths.
        parallel: whether a segment's steps may share a decoder call.
        max_steps: the caller's cap on steps per decoder call (from ``max_decoder_rows``).
        skipped: candidates that were not measured, with the reason.
        key: the cache key, recorded in the decision.

    Raises:
        FdTrtError: when no candidate was measured.
    """
    if not costs:
        why = "; ".join(f"{c.label}: {r}" for c, r in (skipped or {}).items()) or "none available"
        raise FdTrtError(f"backend='auto' found no backend it could run ({why}): pass an explicit backend")
    longest = max(segment_lengths)
    table: list[dict[str, Any]] = []
    best: tuple[float, Candidate, int | None] | None = None
    for cand, cost in costs.items():
        scored = [
            (predict_seconds(cost, segment_lengths, s), s) for s in call_sizes(segment_lengths, parallel, max_steps)
        ]
        # Fewer, larger calls unless smaller ones are clearly faster: within TIE of the best, the
        # measurement cannot tell them apart, and the method's own choice is the whole segment.
        best_t = min(t for t, _ in scored)
        t, s = max((ts for ts in scored if ts[0] <= best_t * (1 + TIE)), key=lambda ts: ts[1])
        spc = None if s >= longest else s
        table.append(
            {
                "label": cand.label,
                "predicted_s": t,
                "steps_per_call": spc,
                "encoder_s": cost.encoder_s,
                "decoder_s": {str(k): v for k, v in sorted(cost.decoder_s.items())},
            }
        )
        if best is None or t < best[0]:
            best = (t, cand, spc)
    for cand, why in (skipped or {}).items():
        table.append({"label": cand.label, "skipped": why})
    assert best is not None
    t, cand, spc = best
    return Decision(cand.backend, cand.precision, dict(cand.options), spc, t, table, dict(key or {}))


# measuring ----------------------------------------------------------------------------------------
def _time_once(runner: Runner, fn: Callable[[], Any]) -> float:
    runner.synchronize()
    t0 = time.perf_counter()
    fn()
    runner.synchronize()
    return time.perf_counter() - t0


def measure(
    runner: Runner,
    latent_shape: tuple[int, int, int],
    text_shape: tuple[int, int],
    rows: int,
    steps: Iterable[int],
    repeats: int = DEFAULT_REPEATS,
    known: CostTable | None = None,
    added_shapes: dict[str, tuple[int, ...]] | None = None,
    round_budget_s: float | None = ROUND_BUDGET_S,
) -> CostTable:
    """Times an active runner's encoder at ``rows`` rows and its decoder at each step count.

    Every shape is called once untimed (first calls at a new shape allocate, and ONNX Runtime
    plans its memory), then ``repeats`` rounds time every shape once each, interleaved, and the
    median per shape is kept; a round of at least ``round_budget_s`` is the last. Interleaving spreads a slow spell of a shared machine over all the
    shapes; the median, unlike the minimum, does not favour short calls, whose luckiest run on a
    loaded machine is much further below their typical cost than a long call's (measured: the
    minimum made single-step torch calls look as cheap per step as 10-step calls, and the run
    they chose took 1.9x longer in its decoder).

    Args:
        runner: an active runner.
        latent_shape: ``(C, h, w)``.
        text_shape: ``(L, D)``.
        rows: rows per step (2B with CFG).
        steps: decoder step counts to time.
        repeats: timed rounds.
        known: costs measured earlier at these rows; only missing step counts are timed.
        added_shapes: per-row shapes of SDXL's added conditioning (``text_embeds``, ``time_ids``),
            or ``None`` for SD 1.x/2.x.
        round_budget_s: a timed round that takes at least this long is the last one (large
            models: one round of calls of seconds each); ``None`` always runs ``repeats`` rounds.

    Returns:
        The costs, including ``known``'s.
    """
    g = torch.Generator().manual_seed(0)
    dev = runner.device
    sample = torch.randn((rows, *latent_shape), generator=g).to(dev)
    text = torch.randn((rows, *text_shape), generator=g).to(dev)
    t = torch.full((rows,), 500.0, device=dev)
    added = {k: torch.randn((rows, *shape), generator=g).to(dev) for k, shape in (added_shapes or {}).items()} or None
    feats = [runner.encode(sample, t, text, added)]

    def enc() -> None:
        feats[:] = [runner.encode(sample, t, text, added)]

    calls: dict[Any, Callable[[], Any]] = {} if known is not None else {"encoder": enc}
    for s in sorted(set(steps)):
        if known is None or s not in known.decoder_s:
            ts = torch.linspace(900.0, 100.0, s, device=dev)
            calls[s] = lambda ts=ts: runner.decode(feats[0], ts, text, added)
    for fn in calls.values():
        fn()
    times: dict[Any, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        spent = 0.0
        for k, fn in calls.items():
            times[k].append(_time_once(runner, fn))
            spent += times[k][-1]
        if round_budget_s is not None and spent >= round_budget_s:
            break
    table = known if known is not None else CostTable(encoder_s=statistics.median(times.pop("encoder")))
    for s, ts_ in times.items():
        table.decoder_s[int(s)] = statistics.median(ts_)
    return table


# cache --------------------------------------------------------------------------------------------
def tuning_cache_dir() -> Path:
    """``$FD_TRT_CACHE/tuning`` (``~/.cache/fd_trt/engines/tuning`` by default)."""
    from fd_trt.utils.cache import engine_cache_root

    return engine_cache_root() / "tuning"


@functools.cache
def library_versions() -> tuple[tuple[str, str | None], ...]:
    """Versions of torch, diffusers, onnx, onnxruntime and tensorrt, read once per process."""
    from fd_trt.graphs.manifest import package_versions

    return tuple(sorted(package_versions().items()))


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(key: dict[str, Any], folder: Path | None = None) -> Path:
    return (folder or tuning_cache_dir()) / f"{key_digest(key)[:24]}.json"


def load_decision(key: dict[str, Any], folder: Path | None = None) -> Decision | None:
    """The cached decision for ``key``, or ``None`` (also for an unreadable or foreign file)."""
    path = cache_path(key, folder)
    try:
        data = json.loads(path.read_text())
        if data.get("format") != TUNING_FORMAT or data.get("decision", {}).get("key") != json.loads(
            json.dumps(key, default=str)
        ):
            return None
        d = Decision(**data["decision"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    d.cached, d.tuning_s = True, 0.0
    return d


#: Most decision files kept in a tuning cache folder; older ones are removed when a new one is written.
MAX_DECISION_FILES = 512

#: Most decisions an [`AutoRunner`][fd_trt.backends.auto.AutoRunner] keeps in memory (least recently used ones go first).
MAX_DECISIONS_IN_MEMORY = 64


def prune_decisions(folder: Path, keep: int = MAX_DECISION_FILES) -> int:
    """Removes the oldest decision files of ``folder`` beyond ``keep``; returns how many it removed.

    Only names `cache_path()` writes (24 hex digits and ``.json``) are considered, so nothing
    else in the folder is ever touched.
    """
    files = []
    for p in folder.glob("*.json"):
        if len(p.stem) == 24 and all(c in "0123456789abcdef" for c in p.stem):
            try:
                files.append((p.stat().st_mtime, p))
            except OSError:
                continue
    files.sort(reverse=True)
    removed = 0
    for _, p in files[keep:]:
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def save_decision(decision: Decision, folder: Path | None = None, keep: int = MAX_DECISION_FILES) -> Path:
    """Writes the decision under its key (atomically: [`fd_trt.utils.files.write_atomic()`][fd_trt.utils.files.write_atomic]), then
    keeps the folder to the newest ``keep`` decision files ([`prune_decisions()`][fd_trt.backends.auto.prune_decisions])."""
    path = cache_path(decision.key, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": TUNING_FORMAT, "decision": decision.as_dict()}
    write_atomic(path, json.dumps(payload, indent=2, default=str))
    prune_decisions(path.parent, keep)
    return path


# the runner ---------------------------------------------------------------------------------------
#: Makes the runner of a candidate, or raises (an unavailable candidate: the message says why).
RunnerFactory = Callable[[Candidate], Runner]


class AutoRunner(Runner):
    """A runner that delegates to the fastest candidate for the run at hand.

    [`plan()`][fd_trt.backends.auto.AutoRunner.plan] (called by the sampler before each run with the schedule and rows) looks the
    decision up in the cache or measures the candidates, then ``encode`` goes to the chosen
    runner and ``decode`` splits a segment into calls of the chosen size.

    Args:
        candidates: what may run, in order of preference on a tie.
        factory: makes (inactive) runners for candidates; a candidate whose factory raises
            [`FdTrtError`][fd_trt.errors.FdTrtError] is skipped with the message as the reason.
        latent_shape: ``(C, h, w)`` this runner serves.
        text_shape: ``(L, D)``.
        base_key: called for the cache key's fixed part (weights hash, device, versions...).
        device: where tensors live.
        repeats: timed rounds over the measured shapes (see [`measure()`][fd_trt.backends.auto.measure]).
        cache_dir: where decisions are cached; ``None`` for [`tuning_cache_dir()`][fd_trt.backends.auto.tuning_cache_dir].
        use_cache: read and write the cache.
        ready: a cheap check of whether a candidate's graphs are built, so that building them
            later invalidates a decision made without them.
        measurer: replaces [`measure()`][fd_trt.backends.auto.measure] (same arguments), for tests that inject costs.

    Attributes:
        tune_on_demand: measure a run whose decision is neither in memory nor in the cache. A
            server turns it off once its sizes are warmed up: a run it has no decision for then
            follows the nearest decision it has (same rows first, then the closest step count),
            or, with none, the first candidate that loads, and nothing is measured or written.
        max_decisions: most decisions kept in memory (least recently used ones are dropped).
    """

    def __init__(
        self,
        candidates: Sequence[Candidate],
        factory: RunnerFactory,
        latent_shape: tuple[int, int, int],
        text_shape: tuple[int, int],
        base_key: Callable[[], dict[str, Any]],
        device: torch.device | str = "cpu",
        repeats: int = DEFAULT_REPEATS,
        cache_dir: Path | None = None,
        use_cache: bool = True,
        ready: Callable[[Candidate], bool] | None = None,
        measurer: Callable[..., CostTable] | None = None,
        added_shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        super().__init__(device, torch.float32)
        if not candidates:
            raise InputError("AutoRunner needs at least one candidate")
        self.candidates = list(candidates)
        self.factory = factory
        self.latent_shape = tuple(latent_shape)
        self.text_shape = tuple(text_shape)
        self.base_key = base_key
        self.repeats = repeats
        self.cache_dir = cache_dir
        self.use_cache = use_cache
        self.ready = ready or (lambda c: True)
        self.measurer = measurer or measure
        self.added_shapes = dict(added_shapes) if added_shapes else None
        #: Read cached decisions (``fd-trt build --tune`` turns it off to measure afresh).
        self.read_cache = True
        self._runners: dict[Candidate, Runner] = {}
        self._costs: dict[tuple[Candidate, int], CostTable] = {}
        self._decisions: OrderedDict[str, Decision] = OrderedDict()
        self.tune_on_demand = True
        self.max_decisions = MAX_DECISIONS_IN_MEMORY
        self._local = threading.local()
        self._tune_lock = threading.RLock()
        #: The latest decision (any thread); [`decision`][fd_trt.backends.auto.AutoRunner.decision] is this thread's.
        self.last_decision: Decision | None = None

    # lifecycle ----------------------------------------------------------------------------------
    def _deactivate(self) -> None:
        for r in self._runners.values():
            r.deactivate()
        self._runners.clear()

    def refit(self, unet: Any) -> bool:
        with self._tune_lock:
            for cand, r in list(self._runners.items()):
                if not r.refit(unet):
                    r.deactivate()
                    del self._runners[cand]
            # New weights: new cache key, and new costs (graph runners may be rebuilt).
            self._costs.clear()
            self._decisions.clear()
        return True

    def _runner(self, cand: Candidate) -> Runner:
        if cand not in self._runners:
            self._runners[cand] = self.factory(cand).activate()
        return self._runners[cand]

    @property  # type: ignore[override]
    def name(self) -> str:
        """``auto:<backend>/<precision>`` once this thread's run is planned, ``auto`` before."""
        d = self.decision
        return "auto" if d is None else f"auto:{d.label}"

    # choosing -----------------------------------------------------------------------------------
    @property
    def decision(self) -> Decision | None:
        """The decision of this thread's current run."""
        return getattr(self._local, "decision", None)

    def key(
        self,
        segment_lengths: Sequence[int],
        key_steps: Sequence[int],
        rows: int,
        parallel: bool,
        max_steps: int | None,
        available: Sequence[Candidate],
    ) -> dict[str, Any]:
        return {
            **self.base_key(),
            "latent_shape": list(self.latent_shape),
            "text_shape": list(self.text_shape),
            "rows": rows,
            "num_steps": int(sum(segment_lengths)),
            "key_steps": list(key_steps),
            "parallel": bool(parallel),
            "max_steps_per_call": max_steps,
            "candidates": [c.label + ("" if self.ready(c) else " (not built)") for c in available],
        }

    def plan(self, schedule: Any, rows: int, parallel: bool = True, max_decoder_rows: int | None = None) -> Decision:
        """Chooses the candidate and decoder call size for a run (from the cache, or by measuring).

        Args:
            schedule: the run's [`KeySchedule`][fd_trt.core.schedule.KeySchedule].
            rows: rows per step (2B with CFG).
            parallel: whether segments may be batched.
            max_decoder_rows: the caller's cap on rows per decoder call.

        Returns:
            The decision, which this thread's ``encode`` / ``decode`` follow until the next plan.
        """
        self._check_active()
        lengths = [len(s) for s in schedule.segments]
        max_steps = None if max_decoder_rows is None else max(1, max_decoder_rows // rows)
        with self._tune_lock:
            key = self.key(lengths, schedule.key_steps, rows, parallel, max_steps, self.candidates)
            digest = key_digest(key)
            decision = self._decisions.get(digest)
            if decision is None and self.use_cache and self.read_cache:
                decision = load_decision(key, self.cache_dir)
            if decision is None and not self.tune_on_demand:
                decision = self._untuned(key, rows, max_steps)
                chosen = next(c for c in self.candidates if c.label == decision.label)
                runner = self._runner(chosen)
                self._local.decision = decision
                self._local.runner = runner
                self.dtype = runner.dtype
                logger.info("auto: no decision for this run and tuning is off; following %s", decision.label)
                return decision
            if decision is None:
                decision = self._tune(lengths, rows, parallel, max_steps, key)
                # Tuning may have built graphs (fd-trt build --tune): key the decision as later runs will.
                decision.key = self.key(lengths, schedule.key_steps, rows, parallel, max_steps, self.candidates)
                digest = key_digest(decision.key)
                if self.use_cache:
                    try:
                        save_decision(decision, self.cache_dir)
                    except OSError as exc:  # a read-only cache must not stop generation
                        logger.warning("could not cache the tuning decision: %s", exc)
            self._decisions[digest] = decision
            self._decisions.move_to_end(digest)
            while len(self._decisions) > max(1, self.max_decisions):
                self._decisions.popitem(last=False)
            chosen = next(c for c in self.candidates if c.label == decision.label)
            runner = self._runner(chosen)
        self._local.decision = decision
        self._local.runner = runner
        self.last_decision = decision
        self.dtype = runner.dtype
        logger.info("%s", decision.summary())
        return decision

    def _untuned(self, key: dict[str, Any], rows: int, max_steps: int | None) -> Decision:
        """The decision of a run that may not be measured: the nearest known one, else the first
        candidate that loads; kept neither in memory nor on disk."""
        known = list(self._decisions.values())
        if self.last_decision is not None and self.last_decision not in known:
            known.append(self.last_decision)
        if known:
            steps = int(key.get("num_steps", 0))

            def distance(d: Decision) -> tuple[int, int]:
                return (abs(int(d.key.get("rows", rows)) - rows), abs(int(d.key.get("num_steps", steps)) - steps))

            near = min(known, key=distance)
            spc = near.steps_per_call
            if max_steps is not None:
                spc = max_steps if spc is None else min(spc, max_steps)
            return Decision(near.backend, near.precision, dict(near.options), spc, math.nan, [], dict(key))
        reasons = []
        for cand in self.candidates:
            try:
                self._runner(cand)
            except FdTrtError as exc:
                reasons.append(f"{cand.label}: {str(exc).split(':')[0]}")
                continue
            return Decision(cand.backend, cand.precision, dict(cand.options), max_steps, math.nan, [], dict(key))
        raise FdTrtError(
            f"backend='auto' found no backend it could run ({'; '.join(reasons)}): pass an explicit backend"
        )

    def _tune(
        self, lengths: list[int], rows: int, parallel: bool, max_steps: int | None, key: dict[str, Any]
    ) -> Decision:
        t0 = time.perf_counter()
        steps = measured_sizes(lengths, parallel, max_steps)
        costs: dict[Candidate, CostTable] = {}
        skipped: dict[Candidate, str] = {}
        for cand in self.candidates:
            try:
                runner = self._runner(cand)
            except FdTrtError as exc:
                skipped[cand] = str(exc).split(":")[0]
                continue
            extra = {"added_shapes": self.added_shapes} if self.added_shapes else {}
            costs[cand] = self.measurer(
                runner,
                self.latent_shape,
                self.text_shape,
                rows,
                steps,
                self.repeats,
                known=self._costs.get((cand, rows)),
                **extra,
            )
            self._costs[(cand, rows)] = costs[cand]
            # Only the best so far stays loaded while the next is measured: two large UNets in
            # memory at a time, not one per candidate (sd15-arch: ORT sessions, a bf16 copy).
            self._release_all_but(choose(costs, lengths, parallel=parallel, max_steps=max_steps).label)
        decision = choose(costs, lengths, parallel=parallel, max_steps=max_steps, skipped=skipped, key=key)
        decision.tuning_s = time.perf_counter() - t0
        self._release_all_but(decision.label)
        return decision

    def _release_all_but(self, label: str) -> None:
        """Closes the loaded runners other than ``label`` and those some decision chose (another
        thread may be running one)."""
        keep = {label, *(d.label for d in self._decisions.values())}
        for cand in list(self._runners):
            if cand.label not in keep:
                self._runners.pop(cand).deactivate()

    # running ------------------------------------------------------------------------------------
    def _current(self, rows: int) -> tuple[Runner, Decision]:
        runner = getattr(self._local, "runner", None)
        if runner is None:
            # Called outside the sampler (calibration's cost probes): the latest decision, or one
            # tuned for single steps at these rows.
            from fd_trt.core.schedule import parse_schedule

            last = self.last_decision
            if last is not None:
                with self._tune_lock:
                    cand = next(c for c in self.candidates if c.label == last.label)
                    self._local.runner, self._local.decision = self._runner(cand), last
            else:
                self.plan(parse_schedule("all", 1), rows)
            runner = self._local.runner
        return runner, self._local.decision

    @property
    def current_runner(self) -> Runner | None:
        """The runner this thread's planned run uses (``None`` before [`plan()`][fd_trt.backends.auto.AutoRunner.plan]); the pipeline
        runs the ControlNet graph on it when it is a graph runner."""
        return getattr(self._local, "runner", None)

    def synchronize(self) -> None:
        runner = getattr(self._local, "runner", None)
        if runner is not None:
            runner.synchronize()

    def encode(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: Added = None) -> Features:
        runner, _ = self._current(int(sample.shape[0]))
        before = runner.launches["encoder"]
        out = runner.encode(sample, timestep, text, added)
        self.launches["encoder"] += runner.launches["encoder"] - before
        return out

    def decode(
        self, features: Features, timesteps: torch.Tensor, text: torch.Tensor, added: Added = None
    ) -> torch.Tensor:
        runner, decision = self._current(int(text.shape[0]))
        before = runner.launches["decoder"]
        n = int(timesteps.shape[0])
        c = decision.steps_per_call or n
        if c >= n:
            out = runner.decode(features, timesteps, text, added)
        else:
            out = torch.cat([runner.decode(features, timesteps[i : i + c], text, added) for i in range(0, n, c)])
        self.launches["decoder"] += runner.launches["decoder"] - before
        return out

    # shallow decoder steps: on the chosen runner, like decode
    def decode_capture(
        self,
        features: Features,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        added: Added = None,
        depths: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        runner, _ = self._current(int(text.shape[0]))
        before = runner.launches["decoder"]
        out = runner.decode_capture(features, timesteps, text, added, depths)
        self.launches["decoder"] += runner.launches["decoder"] - before
        return out

    def decode_shallow(
        self,
        hidden: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        timesteps: torch.Tensor,
        text: torch.Tensor,
        added: Added = None,
    ) -> torch.Tensor:
        runner, _ = self._current(int(text.shape[0]))
        return runner.decode_shallow(hidden, skips, timesteps, text, added)

    def input_conv(self, sample: torch.Tensor) -> torch.Tensor:
        runner, _ = self._current(int(sample.shape[0]))
        return runner.input_conv(sample)


__all__ = [
    "AutoRunner",
    "Candidate",
    "CostTable",
    "Decision",
    "call_sizes",
    "choose",
    "load_decision",
    "measure",
    "prune_decisions",
    "predict_seconds",
    "save_decision",
]
