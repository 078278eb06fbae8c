"""What the libraries under chattune print while it works: one progress display per stage.

datasets draws a bar for every map, filter, conversion and save, and transformers one for loading and
writing weights, plus notices meant for library users (the embedding-resize note, the `loss_type=None`
note, the attention-mask advice at generation). During a chattune run they interleave with the Trainer's
training bar and chattune's own log lines and say nothing the user can act on; inside `quiet_libraries`
they are off, through the libraries' own switches, and back as they were on exit. Hub downloads keep their
bars: a download is a stage of its own that chattune does not report.

Debug logging on chattune's logger (`--debug`) leaves the libraries' output as it is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings

log = logging.getLogger("chattune")

# Python warnings raised from inside these packages are theirs, not the user's or chattune's
LIBRARY_WARNINGS = r"(transformers|trl|datasets|accelerate|peft|torch|huggingface_hub)(\.|$)"


def libraries_shown() -> bool:
    """True when the libraries' own output should show: chattune's logger is at DEBUG (--debug)."""
    return log.isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def quiet_libraries():
    """datasets' and transformers' progress bars off, transformers' logs at error and the libraries' Python
    warnings ignored, for the duration; restored afterwards (a Python API caller keeps its own settings)."""
    if libraries_shown():
        yield
        return
    import datasets
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    before = (datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(),
              hub_utils.are_progress_bars_disabled())
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # this also turns off the hub's bars ...
    if not before[3]:
        hub_utils.enable_progress_bars()  # ... which downloads keep
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=LIBRARY_WARNINGS)
            yield
    finally:
        datasets_on, transformers_on, verbosity, hub_off = before
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            hf_logging.enable_progress_bar()  # the hub's bars too ...
        if hub_off:
            hub_utils.disable_progress_bars()  # ... unless they were off
        hf_logging.set_verbosity(verbosity)


def quiet(func):
    """Decorator: run `func` (an entry point of the Python API) inside quiet_libraries()."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with quiet_libraries():
            return func(*args, **kwargs)

    return wrapper
