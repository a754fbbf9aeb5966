import re

import pytest

from fd_trt.core.schedule import NoiseInjection, parse_schedule
from fd_trt.errors import ScheduleError


def test_paper_schedule_segments_match_the_paper_for_ddim50():
    s = parse_schedule("paper", 50)
    assert s.key_steps == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert [len(seg) for seg in s.segments] == [1, 1, 1, 2, 5, 5, 10, 10, 15]
    assert sum(len(seg) for seg in s.segments) == 50
    assert s.max_segment_len == 15
    assert s.propagates


def test_paper_schedule_is_cut_below_t_for_dpm_solver_20():
    assert parse_schedule("paper", 20).key_steps == (0, 1, 2, 3, 5, 10, 15)


def test_all_uniform_and_explicit_lists():
    assert parse_schedule("all", 4).key_steps == (0, 1, 2, 3)
    assert not parse_schedule("all", 4).propagates
    assert parse_schedule("uniform:5", 12).key_steps == (0, 5, 10)
    assert parse_schedule("0,3,7", 10).key_steps == (0, 3, 7)
    assert parse_schedule([0, 4], 6).segments[1].steps == range(4, 6)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("1,2,3", "no step 0"),
        ([1, 5], "no step 0"),
        ("0,50", "out of range"),
        ([0, -1], "out of range"),
        ("0,5,3", "not sorted"),
        ("0,3,3", "repeats"),
        ("fast", "unknown schedule"),
        ("uniform:0", "positive integer"),
        ("uniform:x", "positive integer"),
        ([0, 1.5], "integers"),
    ],
)
def test_bad_schedules_get_a_clear_error(spec, fragment):
    with pytest.raises(ScheduleError, match=fragment):
        parse_schedule(spec, 50)


@pytest.mark.parametrize("steps", [0, -3])
def test_non_positive_step_counts_are_rejected(steps):
    with pytest.raises(ScheduleError, match="positive integer"):
        parse_schedule("paper", steps)


def test_noise_injection_threshold_is_half_the_training_steps():
    n = NoiseInjection()
    assert n.alpha == 0.003
    assert n.applies(499, 1000) and not n.applies(500, 1000) and not n.applies(981, 1000)
    assert not NoiseInjection(enabled=False).applies(1, 1000)


@pytest.mark.parametrize("n", [200_000])
def test_huge_lists_are_rejected_fast_with_a_short_message(n):
    # Regression (#13): duplicate detection was O(n^2); 200,000 zeros froze `fd-trt serve` for over 60 s.
    import time

    from fd_trt.core.schedule import KeySchedule

    t0 = time.perf_counter()
    with pytest.raises(ScheduleError, match="200000 key steps but the run has only 50 steps") as e:
        parse_schedule([0] * n, 50)
    assert len(str(e.value)) < 300
    # The validator itself (what KeySchedule runs) is linear too: duplicates found in one pass.
    dup = tuple(range(n)) + (5,)
    with pytest.raises(ScheduleError, match=r"repeats step\(s\) \[5\]") as e2:
        KeySchedule(dup, n + 10)
    assert len(str(e2.value)) < 300 and "more)" in str(e2.value)
    assert time.perf_counter() - t0 < 1.0


def test_huge_schedule_strings_are_rejected_fast():
    import time

    t0 = time.perf_counter()
    with pytest.raises(ScheduleError, match="key steps but the run has only 50"):
        parse_schedule(",".join(["0"] * 200_000), 50)
    assert time.perf_counter() - t0 < 1.0


def test_power_places_k_steps_densely_at_the_start():
    # round(50 * (i/17)^2) for i = 0..16, by hand: 0, 0.17, 0.69, 1.56, 2.77, 4.33, 6.23, 8.48, 11.07,
    # 14.01, 17.30, 20.93, 24.91, 29.24, 33.91, 38.93, 44.29; a step that rounds onto the one before
    # moves one later (0, 0, 1, 2, 3, 4, 6 -> 0, 1, 2, 3, 4, 5, 6).
    assert parse_schedule("power:17:2", 50).key_steps == (0, 1, 2, 3, 4, 5, 6, 8, 11, 14, 17, 21, 25, 29, 34, 39, 44)
    # the default exponent is 1.5: round(50 * (i/10)^1.5) = 0, 1.58, 4.47, 8.22, 12.65, 17.68, 23.24,
    # 29.28, 35.78, 42.69
    assert parse_schedule("power:10", 50).key_steps == (0, 2, 4, 8, 13, 18, 23, 29, 36, 43)
    # exponent 1 is an even spread: round(50 * i / 10) = 0, 5, .., 45 = uniform:5.
    assert parse_schedule("power:10:1", 50) == parse_schedule("uniform:5", 50)
    assert parse_schedule("power:20:2.5", 20).key_steps == tuple(range(20))  # K = T: every step
    s = parse_schedule("combined:power:13:2.5|none|1|fresh", 50)
    assert s.key_steps == (0, 1, 2, 3, 4, 5, 7, 11, 15, 20, 26, 33, 41) and s.fresh_input
    assert parse_schedule(s.spec, 50) == s  # the explicit form reads back


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("power:0", "K in [1, 50]"),
        ("power:51", "K in [1, 50]"),
        ("power:x", "integer K"),
        ("power:5:y", "integer K"),
        ("power:5:0", "exponent P in (0, 10]"),
        ("power:5:nan", "exponent P in (0, 10]"),
        ("power:5:inf", "exponent P in (0, 10]"),
    ],
)
def test_bad_power_specs_name_the_fix(spec, fragment):
    with pytest.raises(ScheduleError, match=re.escape(fragment)):
        parse_schedule(spec, 50)
