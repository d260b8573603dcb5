"""Log handlers follow sys.stdout / sys.stderr and never close them (absl's did, mid-suite)."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from pf2lora_core.logs import CurrentStream, detach_absl_stream, stream_handler
from pf2lora_core.nlg_metrics import rouge_l


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
