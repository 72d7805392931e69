"""patchd.poll, the one wait-until-a-deadline loop, on a fake clock: no test here sleeps."""

from __future__ import annotations

from typing import NoReturn

import pytest

from patchd import poll


class FakeClock:
    """Monotonic time that moves only when slept; records every sleep."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.slept.append(seconds)
        self.now += seconds

    @property
    def clock(self) -> poll.Clock:
        return poll.Clock(self.monotonic, self.sleep)


class Expired(Exception):
    pass


def expired() -> NoReturn:
    raise Expired


def test_until_returns_the_first_answer_and_sleeps_between_asks() -> None:
    fake = FakeClock()
    answers = iter([None, None, "ready"])
    got = poll.until(lambda: next(answers), fake.clock.deadline(10), expired, 2.0, fake.clock)
    assert got == "ready"
    assert fake.slept == [2.0, 2.0]


def test_until_asks_once_more_at_the_deadline_then_expires() -> None:
    fake = FakeClock()
    asked: list[float] = []

    def attempt() -> None:
        asked.append(fake.now)

    with pytest.raises(Expired):
        poll.until(attempt, fake.clock.deadline(5), expired, 2.0, fake.clock)
    # 2 + 2 + 1: the last pause is cut to the deadline, where the last ask happens.
    assert fake.slept == [2.0, 2.0, 1.0]
    assert asked == [100.0, 102.0, 104.0, 105.0]


def test_until_asks_at_least_once_even_past_the_deadline() -> None:
    fake = FakeClock()
    assert poll.until(lambda: 7, fake.now - 1, expired, clock=fake.clock) == 7
    with pytest.raises(Expired):
        poll.until(lambda: None, fake.now - 1, expired, clock=fake.clock)
    assert fake.slept == []


def test_until_returns_what_expired_returns_when_it_does_not_raise() -> None:
    fake = FakeClock()
    assert poll.until(lambda: None, fake.clock.deadline(1), lambda: "done", 5, fake.clock) == "done"
    assert fake.slept == [1.0]


def test_until_backs_off() -> None:
    fake = FakeClock()
    with pytest.raises(Expired):
        poll.until(lambda: None, fake.clock.deadline(4), expired, poll.backoff(0.5, 2), fake.clock)
    assert fake.slept == [0.5, 1.0, 2.0, 0.5]


def test_an_error_in_an_attempt_ends_the_wait() -> None:
    fake = FakeClock()

    def broken() -> None:
        raise ValueError("gone")

    with pytest.raises(ValueError, match="gone"):
        poll.until(broken, fake.clock.deadline(10), expired, 1, fake.clock)
    assert fake.slept == []


def test_steady_needs_good_answers_for_the_whole_stretch() -> None:
    fake = FakeClock()
    # good, good, bad (the count starts again), then good until 3 s have passed.
    answers = iter([True, True, False, True, True, True, True, True])
    poll.steady(lambda: next(answers), 3.0, fake.clock.deadline(60), expired, 1.0, fake.clock)
    assert fake.now == 106.0  # good from 103 on; 3 s later


def test_steady_with_zero_stable_for_returns_at_the_first_good_answer() -> None:
    fake = FakeClock()
    answers = iter([False, True])
    poll.steady(lambda: next(answers), 0.0, fake.clock.deadline(60), expired, 1.0, fake.clock)
    assert fake.slept == [1.0]


def test_steady_expires_when_never_stable_long_enough() -> None:
    fake = FakeClock()
    flip = iter([True, False] * 50)
    with pytest.raises(Expired):
        poll.steady(lambda: next(flip), 2.0, fake.clock.deadline(10), expired, 1.0, fake.clock)
    assert fake.now == 110.0
