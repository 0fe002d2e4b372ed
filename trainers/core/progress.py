"""Progress events from a training loop to whoever watches: a CLI progress bar, the UI's loss curve, a test.

A loop owns a `ProgressReporter` and calls it once per step; the reporter measures time, estimates the remaining
time and sends a `ProgressEvent` to every callback::

    history = LossHistory()
    reporter = ProgressReporter(total_steps=500, callbacks=[TqdmProgress(), history])
    for step in range(1, 501):
        ...
        reporter.step(step, loss=loss.item(), lr=scheduler.get_last_lr()[0])
    reporter.close()
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO, runtime_checkable

from tqdm.auto import tqdm

__all__ = [
    "EtaEstimator",
    "LossHistory",
    "ProgressCallback",
    "ProgressEvent",
    "ProgressReporter",
    "TqdmProgress",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    """Where a run stands after ``step`` of ``total_steps``; ``samples`` are image files written at this step."""

    step: int
    total_steps: int
    loss: float | None = None
    lr: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    samples: list[Path] = field(default_factory=list)
    message: str = ""

    @property
    def fraction(self) -> float:
        """Share of the run done, in [0, 1]."""
        return min(1.0, self.step / self.total_steps) if self.total_steps > 0 else 0.0


@runtime_checkable
class ProgressCallback(Protocol):
    """Anything called with each `ProgressEvent` (a function works too)."""

    def __call__(self, event: ProgressEvent) -> None: ...


class EtaEstimator:
    """Remaining time from an exponentially smoothed time per step.

    The first steps (compilation, caching, warm-up) are slow; smoothing lets the estimate settle on the steady rate
    instead of averaging them in forever.

    >>> eta = EtaEstimator(total_steps=10)
    >>> eta.update(step=1, now=0.0) is None
    True
    >>> eta.update(step=2, now=1.0)
    8.0
    """

    def __init__(self, total_steps: int, *, smoothing: float = 0.3) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.total_steps = total_steps
        self.smoothing = smoothing
        self.seconds_per_step: float | None = None
        self._last: tuple[int, float] | None = None

    def update(self, step: int, now: float | None = None) -> float | None:
        """Record that ``step`` finished at ``now`` (monotonic seconds); return the estimated seconds left."""
        now = time.monotonic() if now is None else now
        if self._last is not None and step > self._last[0]:
            rate = (now - self._last[1]) / (step - self._last[0])
            if self.seconds_per_step is None:
                self.seconds_per_step = rate
            else:
                self.seconds_per_step += self.smoothing * (rate - self.seconds_per_step)
        self._last = (step, now)
        return self.eta(step)

    def eta(self, step: int) -> float | None:
        """Estimated seconds left after ``step``; None until two steps were seen."""
        if self.seconds_per_step is None:
            return None
        return max(0, self.total_steps - step) * self.seconds_per_step


class ProgressReporter:
    """Builds `ProgressEvent` s (elapsed time, ETA) and hands them to callbacks; a failing callback is a bug and
    propagates (training should not continue with a silently broken UI)."""

    def __init__(
        self,
        total_steps: int,
        callbacks: Sequence[Callable[[ProgressEvent], None]] = (),
        *,
        start_step: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_steps = total_steps
        self.callbacks = list(callbacks)
        self._clock = clock
        self._start = clock()
        self.eta = EtaEstimator(total_steps)
        # A resumed run starts counting time from its first step here, not from step 0.
        self.eta.update(start_step, self._start)

    def step(
        self,
        step: int,
        *,
        loss: float | None = None,
        lr: float | None = None,
        samples: Sequence[Path] = (),
        message: str = "",
    ) -> ProgressEvent:
        """Report that ``step`` finished; returns the event sent."""
        now = self._clock()
        event = ProgressEvent(
            step=step,
            total_steps=self.total_steps,
            loss=loss,
            lr=lr,
            elapsed_s=now - self._start,
            eta_s=self.eta.update(step, now),
            samples=list(samples),
            message=message,
        )
        self.emit(event)
        return event

    def emit(self, event: ProgressEvent) -> None:
        """Send an event to every callback."""
        for callback in self.callbacks:
            callback(event)

    def close(self) -> None:
        """Close callbacks that hold resources (a progress bar)."""
        for callback in self.callbacks:
            close = getattr(callback, "close", None)
            if callable(close):
                close()


class TqdmProgress:
    """A progress bar on stderr (or ``file``) showing step, loss, learning rate and the ETA."""

    def __init__(self, *, description: str = "training", file: TextIO | None = None, disable: bool = False) -> None:
        self.description = description
        self.file = file
        self.disable = disable
        self._bar: tqdm | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=event.total_steps,
                desc=self.description,
                file=self.file if self.file is not None else sys.stderr,
                disable=self.disable,
                dynamic_ncols=True,
            )
        postfix = {}
        if event.loss is not None:
            postfix["loss"] = f"{event.loss:.4f}"
        if event.lr is not None:
            postfix["lr"] = f"{event.lr:.2e}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(max(0, event.step - self._bar.n))
        if event.message:
            self._bar.write(event.message, file=self.file if self.file is not None else sys.stderr)

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LossHistory:
    """Collects every event: loss curve for the UI and tests, sample image paths, messages."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    def __call__(self, event: ProgressEvent) -> None:
        self.events.append(event)

    @property
    def steps(self) -> list[int]:
        """Steps that reported a loss."""
        return [e.step for e in self.events if e.loss is not None]

    @property
    def losses(self) -> list[float]:
        """Reported losses, in step order."""
        return [e.loss for e in self.events if e.loss is not None]

    @property
    def samples(self) -> list[Path]:
        """Every sample image reported."""
        return [p for e in self.events for p in e.samples]

    def smoothed(self, window: int = 10) -> list[float]:
        """Trailing mean of the loss over ``window`` steps (the curve users read)."""
        values = self.losses
        out = []
        for i in range(len(values)):
            chunk = values[max(0, i - window + 1) : i + 1]
            out.append(sum(chunk) / len(chunk))
        return out
