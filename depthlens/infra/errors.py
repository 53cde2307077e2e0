"""Exceptions that separate user mistakes and broken numbers from bugs.

A `UsageError` means the caller asked for something that cannot be done: a flag
out of range, an unknown model spec, an empty prompt file, a layer the model does
not have, an output folder that cannot be written. Every command-line entry point
prints it as one line (`error: <message>`) and exits 2.

A `NonFiniteError` means a run finished but produced a NaN or infinite number where
a measurement was expected (a model with NaN weights, an overflow): the run fails
(exit 1) with one sentence naming the values, instead of writing them as null or 0.

Anything else that escapes is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """A user mistake: bad flag, value, spec, file or output path.

    The message is one sentence naming the offending value and what is allowed,
    e.g. ``--n-boot must be >= 1, got 0``. It subclasses `ValueError` so code that
    already catches `ValueError` keeps working.
    """


class NonFiniteError(RuntimeError):
    """A computed metric, score or ranking is NaN or infinite: the run's numbers cannot be trusted.

    The message names where the values are (``metrics.clean_mean_refusal_score``,
    ``tables.ranking[0].score``, ...).
    """
