"""The steps every training recipe shares (`chattune train`, and any other trainer composed the same way):
open the run directory, build the model, train under signal and NaN guards, save the model and results.

Each recipe in chattune.commands strings these together with its own data and trainer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from pathlib import Path

from chattune.errors import ChattuneError
from chattune.model import adapters
from chattune.model.load import fit_model_to_tokenizer, load_model, pick_device, resolve_precision
from chattune.model.speed import set_attention_dropout
from chattune.outputs import MERGED_DIR, METRICS_FILE, RESULTS_FILE
from chattune.training import early_stop, rundir, tracking
from chattune.training.checkpoints import discard_staging
from chattune.training.distributed import any_rank, process_state, quiet_unless_main
from chattune.training.final import resume_advice, save_final
from chattune.training.interrupts import StepControl, StopSignals, interrupted_error, nonfinite_error, weights_error
from chattune.training.lock import RunLock

log = logging.getLogger("chattune")


def check_model_kind(cfg) -> None:
    """Stop before any data is read when the model cannot be trained as asked."""
    if cfg.lora.qlora:
        adapters.check_qlora_available()
    if adapters.is_adapter_dir(cfg.model.name):
        raise ChattuneError(f"{cfg.model.name} is a LoRA adapter, not a model: merge it first (chattune merge "
                            f"{cfg.model.name} --output-dir DIR) and train from DIR")


def check_tracking_and_stopping(cfg) -> None:
    """Before any data or weights load: the trackers' packages are installed, and early stopping / --load-best
    can work (evaluation data, a checkpoint at every evaluation)."""
    tracking.check_installed(cfg.train.report_to)
    early_stop.check(cfg)


# a write refused for lack of room or rights: one line naming the path, not a traceback. (`ulimit -f` gives
# EFBIG: CPython ignores SIGXFSZ from startup, so the write fails instead of the process being killed.)
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def write_error(e: OSError, out: Path) -> ChattuneError:
    what = f"cannot write {e.filename or out}: {e.strerror}"
    if not out.is_dir():
        return ChattuneError(what)
    return ChattuneError(f"{what}. {resume_advice(out, 'Free disk space or fix the permissions')}")


def _open(cfg, out: Path, stack: contextlib.ExitStack):
    """Rank 0's share of opening the run directory: lock it, check what it holds (moving an earlier run
    aside for --overwrite), attach the run log; the log handler."""
    stack.enter_context(RunLock(out))
    rundir.set_aside(out, rundir.check_output_dir(cfg))
    handler = rundir.attach_run_log(out)
    stack.callback(_detach, handler)
    return handler


def _detach(handler) -> None:
    log.removeHandler(handler)
    handler.close()


@contextlib.contextmanager
def run_directory(cfg):
    """(process state, checkpoint to resume from or None) for the run in cfg.train.output_dir: locked for
    this run, checked (rundir.check_output_dir), an unfinished checkpoint save discarded, metrics.jsonl
    cut back to the checkpoint's step and the run log attached (rank 0). A failure ends train.log."""
    out = Path(cfg.train.output_dir)
    state = process_state(pick_device())
    with quiet_unless_main(state), contextlib.ExitStack() as stack:
        handler, error = None, None
        if state.is_main_process:
            try:
                handler = _open(cfg, out, stack)
            except ChattuneError as e:
                error = e
            except OSError as e:
                error = write_error(e, out) if e.errno in WRITE_ERRORS else e
        if any_rank([error is not None], state.device)[0]:  # every process stops, not only rank 0
            if error is None:
                error = ChattuneError("rank 0 could not open the output directory")
                error.quiet = True  # rank 0 prints why
            raise error
        try:
            resume = _prepare(cfg, out, state)
            yield state, resume
        except BaseException as e:
            translated = write_error(e, out) if isinstance(e, OSError) and e.errno in WRITE_ERRORS else None
            if handler is not None and isinstance(e, (Exception, KeyboardInterrupt)):
                rundir.log_error_to(handler, translated or e)
            if translated is not None:
                raise translated from e
            raise


def _prepare(cfg, out: Path, state):
    resume = rundir.resolve_resume(cfg.train.resume, out)
    if resume is not None:
        rundir.check_schedule(resume, cfg.train.max_steps, cfg.train.lr_scheduler)
    state.wait_for_everyone()  # every process has chosen the checkpoint before rank 0 tidies up
    if state.is_main_process:
        discard_staging(out)
        if resume is None and (out / METRICS_FILE).exists():
            (out / METRICS_FILE).unlink()  # a fresh run starts a fresh log
        elif resume is not None:
            step = rundir.saved_state(resume).get("global_step", 0)
            if rundir.truncate_metrics(out, step):
                log.info(f"metrics.jsonl: removed the records after step {step}, which this run repeats")
    state.wait_for_everyone()
    return resume


def device_and_precision(cfg) -> tuple[str, str]:
    device = pick_device()
    precision, note = resolve_precision(cfg.train.precision, device)
    if note:
        log.warning(note)
    return device, precision


def build_model(cfg, tokenizer, setup, args):
    """The model to train: loaded (4-bit for QLoRA), fitted to the tokenizer, attention dropout set, and
    wrapped in a LoRA adapter when asked."""
    from transformers import set_seed

    m, lora = cfg.model, cfg.lora.enabled or cfg.lora.qlora
    if lora and cfg.train.lr < 5e-5:
        log.info(f"LoRA usually needs a higher learning rate than full fine-tuning (e.g. --lr 2e-4); this run uses "
                 f"{cfg.train.lr:g}")
    set_seed(cfg.train.seed)
    model = load_model(m.name, m.revision, m.trust_remote_code,
                       quantization_config=adapters.quantization_config() if cfg.lora.qlora else None)
    rows_before = model.get_input_embeddings().weight.shape[0]
    fit_model_to_tokenizer(model, tokenizer, setup)
    if cfg.train.attention_dropout is not None:
        n = set_attention_dropout(model, cfg.train.attention_dropout)
        log.info(f"attention dropout {cfg.train.attention_dropout} in {n} layers (the saved config keeps the model's)")
    if lora:
        model = adapters.wrap(model, cfg.lora, adapters.new_token_ids(tokenizer, setup.added_tokens, rows_before),
                              m.name, m.revision, args)
    return model


def guards(cfg) -> tuple[StopSignals, StepControl]:
    """Ctrl-C / SIGTERM handling and the per-step control (NaN stop, timed saves) for a trainer."""
    signals = StopSignals()
    return signals, StepControl(signals, cfg.train.save_minutes)


def train(trainer, signals: StopSignals, control: StepControl, resume, out: Path, state):
    """trainer.train(), turning a non-finite loss or a signal into one clear error after the right save."""
    if resume:
        log.info(f"resuming from {resume}")
    with signals:
        result = trainer.train(resume_from_checkpoint=resume)
    if control.nonfinite_step is not None:
        raise nonfinite_error(control.nonfinite_step, out)
    if control.stopped_at is not None:
        raise interrupted_error(control, out, quiet=not state.is_main_process)
    problem = weights_error(trainer.model, f"after step {trainer.state.global_step}")
    if problem is not None:  # a NaN from the last optimizer step has no later loss to show it
        raise problem
    return result


def final_evaluation(cfg, trainer, has_eval: bool) -> tuple[dict, dict | None]:
    """(the final model's evaluation, the stopping facts for results.json). The stopping facts are taken first
    (early stopping sees this evaluation too) and logged; the evaluation is not resent to the trackers.

    The Trainer has usually evaluated the final weights already (at its last step, or at the best checkpoint's
    step that --load-best loaded): that record is reused, since evaluating again would double the end of the
    run and repeat its metrics rows."""
    stopping = early_stop.summary(cfg, trainer)
    if stopping and trainer.is_world_process_zero():
        log.info(early_stop.describe(stopping))
    if not has_eval:
        return {}, stopping
    state = trainer.state
    step = state.global_step
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
        step = state.best_global_step  # the weights now loaded were evaluated there
    for record in reversed(state.log_history):
        if "eval_loss" in record and record.get("step") == step:
            return {k: v for k, v in record.items() if k.startswith("eval_")}, stopping
    with tracking.trackers_paused(trainer):
        return trainer.evaluate(), stopping


def save(cfg, trainer, tokenizer, out: Path, results: dict) -> None:
    """The final model directory, written atomically (final.py): weights (every process: FSDP and ZeRO-3
    gather them for rank 0), tokenizer with its chat template, adapter extras; then results.json, and the
    merged model when asked."""
    lora = cfg.lora.enabled or cfg.lora.qlora

    def extras(directory: Path) -> None:
        tokenizer.save_pretrained(str(directory))
        if lora:
            adapters.save_extras(trainer.model, directory)

    save_final(trainer, out, extras)
    if not trainer.is_world_process_zero():
        return
    try:
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str))
    except OSError as e:
        raise ChattuneError(f"the model is saved in {out}, but {out / RESULTS_FILE} could not be written: "
                            f"{e.strerror}") from e
    final = results.get("eval") or {}
    log.info(f"model saved to {out}" + (f"; eval loss {final['eval_loss']:.4f}" if "eval_loss" in final else "")
             + (f", perplexity {final['eval_perplexity']:.2f}" if "eval_perplexity" in final else ""))
    if lora and cfg.lora.merge:
        merged = adapters.merge_adapter(out, out / MERGED_DIR, overwrite=True,
                                        trust_remote_code=cfg.model.trust_remote_code)
        log.info(f"merged model (adapter and base in one) written to {merged}")
