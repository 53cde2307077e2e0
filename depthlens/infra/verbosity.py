"""How much a build says on the terminal: one progress bar per phase, libraries' chatter below WARNING.

A first build (the organism behind the main job) runs for minutes, and a newcomer watches
its progress bars. accelerate logs five INFO lines at every training checkpoint (``Saving
current state to …``, ``Optimizer state saved in …`` …) and transformers draws its own bars
while a GGUF is converted; both bury the bars that matter. ``quiet_build()`` raises those
libraries' loggers to WARNING (and turns transformers' bars off) for the duration of a build,
unless the user asked for everything: ``--verbose`` on a command line (``set_verbose``), or
``DEPTHLENS_VERBOSE=1`` in the environment, which also reaches ``accelerate launch`` ranks.

    >>> with quiet_build():
    ...     logging.getLogger("accelerate.checkpointing").isEnabledFor(logging.INFO)
    False
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

VERBOSE_ENV = "DEPTHLENS_VERBOSE"
VERBOSE_FLAG = "--verbose"

# the loggers of accelerate's modules that log at every checkpoint (save_state / load_state)
QUIET_LOGGERS = ("accelerate", "accelerate.accelerator", "accelerate.checkpointing")


def verbose() -> bool:
    """Whether the user asked for every library's log lines (``--verbose`` or ``DEPTHLENS_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def set_verbose(on: bool) -> None:
    """Turn verbose builds on or off for this process and the processes it starts."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


@contextmanager
def quiet_build():
    """Within the block, accelerate logs WARNING and above only and transformers draws no bars (unless ``verbose()``).

    The loggers' own levels and transformers' bar setting are restored when the block ends,
    errors included.
    """
    if verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    bars = _transformers_bars()
    for lg in loggers:
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    if bars is not None:
        bars[1]()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars is not None and bars[0]:
            bars[2]()


def _transformers_bars():
    """``(enabled now, disable, enable)`` of transformers' progress bars, or None without transformers."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return hf_logging.is_progress_bar_enabled(), hf_logging.disable_progress_bar, hf_logging.enable_progress_bar
