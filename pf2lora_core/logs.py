"""Log streams that follow ``sys.stdout`` / ``sys.stderr`` instead of holding on to them.

A handler made with ``StreamHandler(sys.stderr)`` keeps the stream of the moment it was made. Hosts
swap those streams (a SuperNode mirroring its apps' output, pytest capturing each test), so such a
handler later writes to a stream its owner has closed, or, worse, closes it: absl's handler
(rouge-score imports absl) closes its stream on ``logging.shutdown`` unless that stream *is* the
current ``sys.stderr``, and every ``logging.config.dictConfig`` (Hydra runs one per job) shuts all
handlers down. That closed pytest's capture file mid-suite and crashed the test session.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

StreamName = Literal["stdout", "stderr"]


class CurrentStream:
    """A text stream that writes to whatever ``sys.<name>`` is now, and is never closed."""

    def __init__(self, name: StreamName) -> None:
        self.name = name

    @property
    def target(self) -> TextIO:
        return getattr(sys, self.name)

    def write(self, text: str) -> int:
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def close(self) -> None:
        """The process owns ``sys.stdout`` / ``sys.stderr``, not the handler writing to them."""


def stream_handler(name: StreamName, fmt: str) -> logging.Handler:
    """A handler on :class:`CurrentStream` ``name`` with the format ``fmt`` (times as H:M:S)."""
    handler = logging.StreamHandler(CurrentStream(name))
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    return handler


def detach_absl_stream() -> None:
    """Point absl's log handler (made once, when absl is imported) at the current ``sys.stderr``.

    Call after importing a library that imports absl (rouge-score)."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler().python_handler
    if not isinstance(handler.stream, CurrentStream):
        with handler.lock:  # not setStream: it flushes the old stream, which may be closed by now
            handler.stream = CurrentStream("stderr")
