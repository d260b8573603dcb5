"""Console output: log streams that follow ``sys.stdout`` / ``sys.stderr``, quiet libraries, round progress.

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
import warnings
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


# Warnings of libraries we depend on that say nothing actionable to a user of this app: (message regex,
# category). Matched by message, so any other warning of the same category still shows.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # transformers 5 reads its own deprecated property when peft wraps a model
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # Ray's tip about a future default (raised by ray.init in the simulation process); its env var
    # would change which devices zero-GPU actors see, so the tip is filtered, not acted on
    (r"Tip: In future versions of Ray, Ray will no longer override accelerator", FutureWarning),
)


def quiet_libraries() -> None:
    """Silence datasets' and transformers' progress bars and info chatter, and the known warnings.

    Through each library's own switches (datasets / transformers logging and progress bars, warning
    filters by message), never by redirecting streams: our loggers (``pf2lora.*``), Flower's, and
    every library's errors and other warnings still show. Idempotent; call once per process, before
    the libraries do their work (the ServerApp at import, each ClientApp process on its first message).
    """
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def progress(elapsed_s: float, done: int, total: int) -> str:
    """``elapsed 1:05 | ~2:10 left``: time so far and the rest at the mean pace of the rounds done.

    ``done`` counts the rounds finished (the round number, also after a resume, whose elapsed time
    includes the rounds before it); the estimate is ``elapsed / done * (total - done)``.
    """
    left = elapsed_s / done * (total - done) if done > 0 else float("nan")
    return f"elapsed {_clock(elapsed_s)} | ~{_clock(left)} left"


def _clock(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour); ``?`` when unknown."""
    if seconds != seconds or seconds < 0:  # NaN
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
