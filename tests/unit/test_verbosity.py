"""quiet_libraries: the libraries' progress bars and notices are off inside and restored after; with debug
logging (--debug) they stay on."""

from __future__ import annotations

import logging
import warnings

import datasets
from huggingface_hub import utils as hub_utils
from transformers.utils import logging as hf_logging

from chattune.verbosity import quiet, quiet_libraries


def _state():
    return (datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(),
            hub_utils.are_progress_bars_disabled())


def test_quiet_inside_restored_after_and_downloads_keep_their_bars():
    hf_logging.set_verbosity_warning()
    before = _state()
    assert before[:2] == (True, True)

    @quiet
    def entry():
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", category=UserWarning)
            # a library's warning is dropped inside; the user's own is not
            exec(compile("import warnings; warnings.warn('library notice', FutureWarning)", "x", "exec"),
                 {"__name__": "transformers.training_args"})
            warnings.warn("user notice", UserWarning, stacklevel=1)
        return _state(), [str(w.message) for w in caught]

    inside, caught = entry()
    assert inside == (False, False, hf_logging.ERROR, False)
    assert caught == ["user notice"]
    assert _state() == before


def test_debug_logging_leaves_the_libraries_output_alone():
    log = logging.getLogger("chattune")
    old = log.level
    log.setLevel(logging.DEBUG)
    try:
        before = _state()
        with quiet_libraries():
            assert _state() == before
    finally:
        log.setLevel(old)
