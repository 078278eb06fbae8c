"""The steps every training recipe shares (`chattune train`, and any other trainer composed the same way):
open the run directory, build the model, train under signal and NaN guards, save the model and results.

Each recipe in chattune.commands strings these together with its own data and trainer.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from chattune.errors import ChattuneError
from chattune.model import adapters
from chattune.model.load import fit_model_to_tokenizer, load_model, pick_device, resolve_precision
from chattune.model.speed import set_attention_dropout
from chattune.outputs import MERGED_DIR, METRICS_FILE, RESULTS_FILE
from chattune.training import early_stop, tracking
from chattune.training.checkpoints import discard_staging
from chattune.training.distributed import process_state, quiet_unless_main
from chattune.training.interrupts import StepControl, StopSignals, interrupted_error, nonfinite_error
from chattune.training.rundir import attach_run_log, resolve_resume

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


@contextlib.contextmanager
def run_directory(cfg):
    """(process state, checkpoint to resume from or None) for the run in cfg.train.output_dir, with the
    directory created, an unfinished checkpoint save discarded and the run log attached (rank 0)."""
    out = Path(cfg.train.output_dir)
    state = process_state(pick_device())
    with quiet_unless_main(state):
        resume = resolve_resume(cfg.train.resume, out)
        state.wait_for_everyone()  # every process has chosen the checkpoint before rank 0 tidies up
        handler = None
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            discard_staging(out)
            handler = attach_run_log(out)
            if resume is None and (out / METRICS_FILE).exists():
                (out / METRICS_FILE).unlink()  # a fresh run starts a fresh log; a resumed one appends
        state.wait_for_everyone()
        try:
            yield state, resume
        finally:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()


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
    return result


def final_evaluation(cfg, trainer, has_eval: bool) -> tuple[dict, dict | None]:
    """(the final model's evaluation, the stopping facts for results.json). The stopping facts are taken first
    (early stopping sees this evaluation too) and logged; the evaluation is not resent to the trackers."""
    stopping = early_stop.summary(cfg, trainer)
    if stopping and trainer.is_world_process_zero():
        log.info(early_stop.describe(stopping))
    with tracking.trackers_paused(trainer):
        final = trainer.evaluate() if has_eval else {}
    return final, stopping


def save(cfg, trainer, tokenizer, out: Path, results: dict) -> None:
    """The final model directory: weights (every process: FSDP and ZeRO-3 gather them for rank 0), tokenizer
    with its chat template, adapter extras, results.json, and the merged model when asked."""
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(str(out))
    lora = cfg.lora.enabled or cfg.lora.qlora
    if lora:
        adapters.save_extras(trainer.model, out)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str))
    final = results.get("eval") or {}
    log.info(f"model saved to {out}" + (f"; eval loss {final['eval_loss']:.4f}, perplexity "
                                         f"{final['eval_perplexity']:.2f}" if "eval_loss" in final else ""))
    if lora and cfg.lora.merge:
        merged = adapters.merge_adapter(out, out / MERGED_DIR, overwrite=True,
                                        trust_remote_code=cfg.model.trust_remote_code)
        log.info(f"merged model (adapter and base in one) written to {merged}")
