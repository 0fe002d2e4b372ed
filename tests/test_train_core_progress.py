"""Progress a user sees: a bar with loss and ETA on the CLI, a loss curve in the UI."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from trainers.core.progress import (
    EtaEstimator,
    LossHistory,
    ProgressCallback,
    ProgressEvent,
    ProgressReporter,
    TqdmProgress,
)


def test_eta_settles_on_the_steady_rate_after_a_slow_first_step() -> None:
    eta = EtaEstimator(total_steps=100, smoothing=0.3)
    assert eta.update(0, now=0.0) is None
    eta.update(1, now=30.0)  # warm-up: 30 s for the first step
    now = 30.0
    for step in range(2, 41):
        now += 1.0  # then 1 s per step
        remaining = eta.update(step, now=now)
    assert remaining == pytest.approx(60.0, rel=0.01)  # 60 steps left at ~1 s, the warm-up forgotten


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reporter_sends_events_with_elapsed_and_eta(tmp_path: Path) -> None:
    clock = FakeClock()
    history = LossHistory()
    seen: list[ProgressEvent] = []
    reporter = ProgressReporter(total_steps=10, callbacks=[history, seen.append], start_step=4, clock=clock)
    assert isinstance(history, ProgressCallback)
    for step, loss in [(5, 0.5), (6, 0.3), (7, 0.1)]:
        clock.now += 2.0
        event = reporter.step(step, loss=loss, lr=1e-4)
    assert event.elapsed_s == pytest.approx(6.0)
    assert event.eta_s == pytest.approx(6.0)  # 3 steps left at 2 s
    assert event.fraction == pytest.approx(0.7)
    reporter.step(8, samples=[tmp_path / "s.png"], message="sampled")
    assert history.steps == [5, 6, 7] and history.losses == [0.5, 0.3, 0.1]
    assert history.samples == [tmp_path / "s.png"]
    assert history.smoothed(window=2) == pytest.approx([0.5, 0.4, 0.2])
    assert len(seen) == 4


def test_tqdm_bar_shows_step_loss_and_messages() -> None:
    out = io.StringIO()
    bar = TqdmProgress(description="dreambooth", file=out)
    reporter = ProgressReporter(total_steps=4, callbacks=[bar])
    reporter.step(1, loss=0.25, lr=1e-4)
    reporter.step(2, loss=0.125, lr=1e-4, message="saved checkpoint-2")
    reporter.close()
    text = out.getvalue()
    assert "dreambooth" in text and "2/4" in text and "loss=0.1250" in text
    assert "saved checkpoint-2" in text
