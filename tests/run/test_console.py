"""Log handlers follow sys.stdout / sys.stderr and never close them (absl's did, mid-suite)."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from pf2lora_core.run.console import CurrentStream, detach_absl_stream, progress, quiet_libraries, stream_handler
from pf2lora_core.training.generation_metrics import rouge_l


def test_absl_handler_neither_keeps_nor_closes_the_stderr_it_was_made_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from absl import logging as absl_logging

    made_on = io.StringIO()
    handler = absl_logging.get_absl_handler().python_handler
    # as if absl was imported while this was stderr; not monkeypatched: undoing it would hand the handler
    # back a stream of pytest's for a later Hydra run to close (the bug under test)
    handler.stream = made_on
    try:
        monkeypatch.setattr(sys, "stderr", made_on)
        assert rouge_l(["the cat sat"], [["the cat sat"]]) == pytest.approx(100.0)
        now = io.StringIO()
        monkeypatch.setattr(sys, "stderr", now)  # the host swaps stderr (pytest, a SuperNode's mirror)
        handler.emit(logging.LogRecord("absl", logging.WARNING, __file__, 1, "after the swap", None, None))
        handler.close()  # what logging.shutdown / every dictConfig (Hydra's job logging) does
        assert not made_on.closed and not now.closed
        assert "after the swap" in now.getvalue() and "after the swap" not in made_on.getvalue()
    finally:
        detach_absl_stream()


@pytest.mark.parametrize("name", ["stdout", "stderr"])
def test_stream_handler_writes_to_the_stream_of_the_moment(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger(f"pf2lora.test.{name}")
    logger.propagate, logger.handlers = False, [stream_handler(name, "%(levelname)s %(message)s")]
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, name, first)
    logger.warning("one")
    first.close()  # e.g. a finished test's capture
    monkeypatch.setattr(sys, name, second)
    logger.warning("two")
    logger.handlers[0].close()
    assert second.getvalue() == "WARNING two\n" and not second.closed
    assert isinstance(logger.handlers[0].stream, CurrentStream)


@pytest.mark.parametrize(
    ("elapsed", "done", "total", "expected"),
    [
        (30.0, 1, 4, "elapsed 0:30 | ~1:30 left"),  # 30 s a round, 3 to go
        (125.0, 5, 5, "elapsed 2:05 | ~0:00 left"),
        (3700.0, 2, 3, "elapsed 1:01:40 | ~30:50 left"),
        (10.0, 0, 3, "elapsed 0:10 | ~? left"),  # no round done yet: no pace to go by
    ],
)
def test_progress_elapsed_and_rest_at_mean_pace(elapsed: float, done: int, total: int, expected: str) -> None:
    assert progress(elapsed, done, total) == expected


def test_quiet_libraries_uses_their_switches_and_filters_only_the_known_warnings() -> None:
    import warnings

    import datasets
    import transformers

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()  # installs its filters in front of "always"
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning, stacklevel=1)
        ray_tip = "Tip: In future versions of Ray, Ray will no longer override accelerator visible devices"
        warnings.warn(ray_tip, FutureWarning, stacklevel=1)
        warnings.warn("some other future change", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["some other future change"]
    assert not datasets.is_progress_bar_enabled()
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert transformers.logging.get_verbosity() == transformers.logging.ERROR
    datasets.enable_progress_bars()  # leave the test process as it was for later tests
    transformers.utils.logging.enable_progress_bar()
