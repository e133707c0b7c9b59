"""Wall times and facts of a module's slow set-up steps, printed to the terminal afterwards.

The container, chart and node modules build images, start engines and install releases;
their reports say where a run's minutes went. Output goes past pytest's capture so a
first-time build shows its progress and the report lands in CI's log, not in a teardown's
captured output.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import pytest

__all__ = ["PhaseLog", "uncaptured"]


def uncaptured(config: pytest.Config) -> contextlib.AbstractContextManager[object]:
    """A block whose output reaches the terminal even while pytest captures."""
    capture = config.pluginmanager.getplugin("capturemanager")
    return capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()


class PhaseLog:
    """Named wall times (summed over repeats) and facts, reported as `[<label>] name: ...`."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.timings: dict[str, float] = {}
        self.facts: dict[str, str] = {}

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - started

    def report(self, config: pytest.Config, extra: Iterable[str] = ()) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        with uncaptured(config):
            reporter.write_line("")
            for name, seconds in self.timings.items():
                reporter.write_line(f"[{self.label}] {name}: {seconds:.1f}s")
            for name, fact in self.facts.items():
                reporter.write_line(f"[{self.label}] {name}: {fact}")
            for line in extra:
                reporter.write_line(f"[{self.label}] {line}")
