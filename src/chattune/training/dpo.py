"""TRL's DPOTrainer, composed with chattune's log-prob head, reference model, tokenization and run machinery.

In TRL 1.16 one method, `_compute_loss`, does the whole step (policy and reference forwards, every loss type,
WPO weights, the rewards/* metrics), and it gets every log-probability from the model itself:
`model(..., labels=labels, fused_lm_head=True).log_probs`, a forward that `add_fused_lm_head` patches in during
`__init__`. That patched forward is the seam: chattune's head (model/logprobs.py) keeps its contract and scores
only the reply rows, so TRL's loss code, reference handling, precompute pass and metrics run unmodified
(tests/unit/training/test_dpo_trainer.py holds loss and gradients equal to TRL's within 1e-5).

What chattune adds, as for its SFT trainer (trainer.py): atomic checkpoints, the NaN guard, length-grouped
batches, tokens per second in the log, and no TRL model card. What is overridden, and why:

- `__init__`: TRL installs its head (and may precompute reference log-probs) inside `__init__`, so chattune's is
  put in place of `add_fused_lm_head` for that call. With no reference given the reference is the starting
  model: a frozen copy in memory (TRL would load the model's path again: a hub download, or the wrong
  vocabulary for a model whose embeddings grew for the chat template); with --precompute-ref none is kept; under
  LoRA the base with the adapter disabled (TRL would add a second "ref" adapter).
- `_prepare_dataset`: rows arrive tokenized (data/preferences.py: prompt cut from the left, reply with its
  end-of-turn token, cuts counted); TRL's would tokenize them again.
"""

from __future__ import annotations

import contextlib
import copy

from trl import DPOTrainer

from chattune.data.preferences import TOKEN_COLUMNS
from chattune.model.load import pick_device
from chattune.model.logprobs import install_logprob_head
from chattune.model.loss import fast_loss_supported
from chattune.model.speed import prepare_for_training
from chattune.training.checkpoints import AtomicCheckpoints
from chattune.training.interrupts import GuardedSteps
from chattune.training.sampling import LengthGroupedSampling
from chattune.training.tracking import ThroughputLog


def _install_like_trl(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """add_fused_lm_head's signature, chattune's head."""
    if temperature != 1.0 or cast_lm_head_to_fp32:
        raise ValueError("chattune's log-prob head runs at temperature 1 in the model's precision")
    install_logprob_head(model, outputs)


@contextlib.contextmanager
def chattune_head_in_trl():
    """Within: TRL's DPOTrainer installs chattune's log-prob head where it would install its own."""
    import trl.trainer.dpo_trainer as module

    if not hasattr(module, "add_fused_lm_head"):
        raise RuntimeError("this TRL version no longer installs its LM head through add_fused_lm_head; chattune's "
                           "DPO head needs updating")
    saved = module.add_fused_lm_head
    module.add_fused_lm_head = _install_like_trl
    try:
        yield
    finally:
        module.add_fused_lm_head = saved


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def frozen_copy(model):
    """The reference model: a copy of the starting model, in eval mode, without gradients."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


class ChattuneDPOTrainer(GuardedSteps, LengthGroupedSampling, ThroughputLog, AtomicCheckpoints, DPOTrainer):
    def __init__(self, model, ref_model=None, *, args, **kwargs):
        lora = is_peft(model) or kwargs.get("peft_config") is not None
        # speed-ups that leave what is learned unchanged (model/speed.py), before the reference is copied
        self.speedups = prepare_for_training(model, pick_device())
        if ref_model is None and not lora and not args.precompute_ref_log_probs:
            ref_model = frozen_copy(model)
        # WPO weighting needs log(sum p^2), which only TRL's head computes
        self.fast_head = fast_loss_supported(model) and not args.use_weighting
        with chattune_head_in_trl() if self.fast_head else contextlib.nullcontext():
            super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        if is_peft(self.model) and "ref" in self.model.peft_config:
            # TRL copies a pre-wrapped adapter as "ref"; chattune's adapter is fresh, so the reference is the base
            # with the adapter disabled: no second copy
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        names = getattr(dataset, "column_names", None) or list(next(iter(dataset)).keys())
        if set(TOKEN_COLUMNS) <= set(names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def create_model_card(self, *args, **kwargs):
        # TRL writes OUTPUT/README.md at every checkpoint; chattune writes the card from the run's own results
        return None
