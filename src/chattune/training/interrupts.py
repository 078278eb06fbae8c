"""Stopping well: Ctrl-C or SIGTERM saves a checkpoint at the next step boundary, a NaN or infinite
loss stops the run at the step it happened (without saving the broken weights), and a timer asks
for a checkpoint every N minutes.

Every decision is taken at a step boundary and agreed across processes (one small all-reduce per
step), because ranks that disagree about saving or stopping would wait on each other for ever.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
import time

import torch
from transformers import TrainerCallback

from chattune.errors import ChattuneError
from chattune.training.checkpoints import newest_complete
from chattune.training.distributed import any_rank

log = logging.getLogger("chattune")

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingInterrupted(ChattuneError):
    """The run stopped on a signal after saving a checkpoint; the message says how to resume."""

    prefix = ""

    def __init__(self, message: str, signum: int, quiet: bool = False):
        super().__init__(message)
        self.exit_code = EXIT_CODES.get(signum, 130)
        self.quiet = quiet  # the same message from every process would only repeat rank 0's


class NonFiniteLoss(ChattuneError):
    """The loss became NaN or infinite; training stopped before saving the broken weights."""


class StopSignals:
    """While active, SIGINT and SIGTERM set a flag instead of killing the process; a second Ctrl-C
    stops at once (KeyboardInterrupt) for a user who does not want to wait for the checkpoint."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning(f"{signal.Signals(signum).name} received: saving a checkpoint at the end of this step, then "
                    "stopping" + (" (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StepControl(TrainerCallback):
    """Stop or save at step boundaries: on a signal, on a non-finite loss, and on a save timer."""

    def __init__(self, signals: StopSignals | None = None, save_minutes: float | None = None):
        self.signals = signals
        self.save_seconds = save_minutes * 60 if save_minutes else None
        # flags kept on the device: reading one back makes the host wait for the GPU, so the first bad step is
        # tracked there and read only when something depends on it (a log, an evaluation, a save, the end)
        self._bad = None  # this step's micro-batches
        self._first_bad = None  # the first step whose loss was not finite, or -1
        self._last_save = time.monotonic()
        self.nonfinite_step: int | None = None
        self.stopped_at: int | None = None
        self.stop_signal: int | None = None
        self.reads = 0  # how many times the flag was read back (tests)

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Called by the trainer with every micro-batch's loss."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad = bad if self._bad is None else (self._bad | bad)

    def _first_nonfinite_step(self, step: int, read: bool) -> int | None:
        """Fold this step's flag into the first bad step (on the device); read it back only if `read`."""
        if self._bad is not None:
            if self._first_bad is None:
                self._first_bad = torch.full((), -1, dtype=torch.long, device=self._bad.device)
            self._first_bad = torch.where(self._bad & (self._first_bad < 0), step, self._first_bad)
            self._bad = None
        if not read or self._first_bad is None:
            return None
        self.reads += 1
        first = int(self._first_bad.item())
        return first if first >= 0 else None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_save = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        signalled = self.signals is not None and self.signals.received is not None
        due = self.save_seconds is not None and time.monotonic() - self._last_save >= self.save_seconds
        multi = torch.distributed.is_available() and torch.distributed.is_initialized()
        # the Trainer's flow callback has already set this step's log/evaluate/save/stop decisions; a signal or the
        # timer asks for a save too: the flag is read before any of them
        read = (multi or signalled or due or control.should_log or control.should_evaluate or control.should_save
                or control.should_training_stop or state.global_step >= state.max_steps > 0)
        first_bad = self._first_nonfinite_step(state.global_step, read)
        bad, signalled, due = any_rank([first_bad is not None, signalled, due], args.device)
        if bad:
            self.nonfinite_step = first_bad if first_bad is not None else state.global_step  # another rank's
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False
            control.should_log = True  # the log shows the NaN
        elif signalled:
            self.stopped_at = state.global_step
            self.stop_signal = (self.signals.received if self.signals and self.signals.received
                                else signal.SIGTERM)  # another process got it
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # the user asked to stop: save and go, no evaluation first
        elif due:
            control.should_save = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.nonfinite_step is None and (control.should_save or control.should_evaluate):
            first_bad = self._first_nonfinite_step(state.global_step, read=True)
            if first_bad is not None:
                self.nonfinite_step = first_bad
                control.should_training_stop = True
        if self.nonfinite_step is not None:
            control.should_save = False  # the epoch-end save would write the broken weights
            control.should_evaluate = False
        if self.stopped_at is not None:
            # the loop ends the epoch after a stop: its evaluation would delay the exit, and the step's save is done
            control.should_evaluate = False
            control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last_save = time.monotonic()


class NonFiniteWeights(ChattuneError):
    """Weights or optimizer state hold NaN or infinity: training on them would only spread it."""


def _first_nonfinite(tensors) -> str | None:
    for name, t in tensors:
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def weights_error(model, where: str) -> NonFiniteWeights | None:
    """An error naming the first parameter that is NaN or infinite, or None."""
    bad = _first_nonfinite(model.named_parameters())
    if bad is None:
        return None
    return NonFiniteWeights(f"{where} the model holds NaN or infinite weights ({bad}); nothing was saved from them. "
                            "Resume from an earlier checkpoint (--resume PATH), or start a new run with a lower --lr")


class ResumeCheck(TrainerCallback):
    """After a checkpoint is loaded (the Trainer loads it before on_train_begin), refuse to train on weights or
    optimizer state that are not finite: a checkpoint broken before it was saved passes its checksums."""

    def __init__(self, checkpoint: str | None):
        self.checkpoint = checkpoint

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.checkpoint:
            return
        from chattune.training.rundir import check_schedule

        # a total from --epochs and the data, which run_directory could not know before the data was read
        scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        check_schedule(self.checkpoint, state.max_steps, scheduler,
                       f"this run's {state.max_steps} steps (from --epochs and the data)")
        name = os.path.basename(os.path.normpath(self.checkpoint))
        bad = _first_nonfinite(model.named_parameters()) if model is not None else None
        what = "weights"
        if bad is None and optimizer is not None:
            what = "optimizer state"
            bad = _first_nonfinite((f"{key} of parameter {i}", t) for i, s in enumerate(optimizer.state.values())
                                   for key, t in s.items())
        if bad is not None:
            raise NonFiniteWeights(f"{name} holds NaN or infinite {what} ({bad}): training on it would only spread "
                                   f"them. Resume from an earlier checkpoint with --resume PATH (or delete {name})")


def resume_command(argv: list[str] | None = None) -> str:
    """The command that continues this run: the same arguments, with --resume (and no explicit path)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "rerun the same launch command (torchrun or accelerate launch) with --resume added"
    if argv[:1] != ["train"]:  # run_train called from Python
        return "run the same training again with train.resume set to true"
    kept, skip_value = [], False
    for a in argv:
        if skip_value:
            skip_value = False
            if not a.startswith("-"):
                continue
        if a == "--resume":
            skip_value = True
            continue
        if a.startswith("--resume="):
            continue
        kept.append(a)
    return "chattune " + shlex.join(kept + ["--resume"])


def nonfinite_error(step: int, out) -> NonFiniteLoss:
    found, _ = newest_complete(out, content=False)
    kept = (f"The last good checkpoint, {found}, is kept (--resume continues from it, with the learning-rate "
            "schedule it was saved with)" if found is not None else "No checkpoint had been saved before it")
    return NonFiniteLoss(f"the loss became NaN or infinite at step {step}; training stopped without saving that "
                         f"step's weights. {kept}. Check the data, or start a new run with a lower --lr or a longer "
                         "--warmup")


def interrupted_error(control: StepControl, out, quiet: bool = False) -> TrainingInterrupted:
    name = signal.Signals(control.stop_signal).name
    found, _ = newest_complete(out, content=False)
    saved = f"checkpoint saved to {found}" if found is not None else "no checkpoint could be saved"
    return TrainingInterrupted(f"interrupted by {name} at step {control.stopped_at}: {saved}; resume with: "
                               f"{resume_command()}", control.stop_signal, quiet=quiet)


class GuardedSteps:
    """Trainer mixin: every micro-batch loss goes to the run's StepControl, which stops the run at the step
    whose loss is not finite (every chattune trainer: SFT, DPO)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, StepControl):
                callback.observe_loss(loss)
        return loss
