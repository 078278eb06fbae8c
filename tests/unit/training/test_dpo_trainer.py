"""chattune's DPO step equals TRL's unmodified DPOTrainer on the same batch and model: the loss, every logged
metric and every parameter gradient, within 1e-5 (tiny GPT-2, fp32, CPU); and the reference model is the starting
model (a frozen copy, precomputed log-probs, or under LoRA the base with the adapter disabled)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from chattune.data.preferences import to_canonical_pair, tokenize_pairs
from chattune.demo import addition
from chattune.model.logprobs import install_logprob_head, sequence_logprobs
from chattune.training.dpo import ChattuneDPOTrainer, frozen_copy

from conftest import preference_rows

TOL = 1e-5
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def _pairs(n=6, seed=3):
    rng = random.Random(seed)
    convs = [addition.conversation(rng, addition.operand_pairs(False)) for _ in range(n)]
    return [to_canonical_pair(r)[0] for r in preference_rows(convs)]


def _args(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                report_to="none", per_device_train_batch_size=6, beta=0.1, max_length=None, seed=0)
    return DPOConfig(**{**base, **kw})


def _perturbed(model, seed=7):
    """Move the model off its reference so that log-ratios, rewards and margins are not zero."""
    torch.manual_seed(seed)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return moved


def _step(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n.replace(".default", ""): p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _compare(a, b):
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = a, b
    assert abs(float(loss_a) - float(loss_b)) <= TOL
    for k in METRICS:
        assert abs(metrics_a[k] - metrics_b[k]) <= TOL * max(1.0, abs(metrics_b[k])), k
    assert grads_a.keys() == grads_b.keys() and grads_a
    worst = max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a)
    assert worst <= TOL, worst


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_loss_metrics_and_gradients_equal_trl(tmp_path, chat_model, loss_type):
    model, tok = chat_model
    start = _perturbed(model)
    pairs = _pairs()
    rows, _ = tokenize_pairs(tok, pairs)
    kw = {"loss_type": [loss_type], "label_smoothing": 0.1 if loss_type == "robust" else 0.0}
    trl = DPOTrainer(model=copy.deepcopy(start), ref_model=frozen_copy(model), args=_args(tmp_path, "trl", **kw),
                     train_dataset=Dataset.from_list(pairs), processing_class=tok)
    ours = ChattuneDPOTrainer(model=copy.deepcopy(start), ref_model=frozen_copy(model),
                              args=_args(tmp_path, "ours", **kw), train_dataset=Dataset.from_list(rows),
                              processing_class=tok)
    assert hasattr(ours.model, "_chattune_unpatched_forward") and not hasattr(trl.model, "_chattune_unpatched_forward")
    assert hasattr(ours.ref_model, "_chattune_unpatched_forward")
    batch = ours.data_collator(rows)
    # the collated rows: prompt + reply, the completion mask on the reply tokens (with the end-of-turn token)
    first = rows[0]
    n = len(first["prompt_ids"]) + len(first["chosen_ids"])
    assert batch["input_ids"][0, :n].tolist() == first["prompt_ids"] + first["chosen_ids"]
    assert batch["completion_mask"][0, :n].tolist() == [0] * len(first["prompt_ids"]) + [1] * len(first["chosen_ids"])
    _compare(_step(ours, batch), _step(trl, batch))


def test_default_reference_is_a_frozen_copy_of_the_starting_model(tmp_path, chat_model):
    model, tok = chat_model
    rows, _ = tokenize_pairs(tok, _pairs())
    ours = ChattuneDPOTrainer(model=model, args=_args(tmp_path, "ours"), train_dataset=Dataset.from_list(rows),
                              processing_class=tok)
    assert ours.ref_model is not None and ours.ref_model is not model
    assert not any(p.requires_grad for p in ours.ref_model.parameters())
    loss, _, metrics = _step(ours, ours.data_collator(rows))
    # before any update the policy is its reference: log-ratios are 0, the sigmoid loss is log 2
    assert abs(float(loss) - 0.6931472) <= TOL and abs(metrics["rewards/margins"]) <= TOL


def test_precomputed_reference_equals_trl(tmp_path, chat_model):
    model, tok = chat_model
    pairs = _pairs()
    rows, _ = tokenize_pairs(tok, pairs)
    kw = {"precompute_ref_log_probs": True}
    ours = ChattuneDPOTrainer(model=copy.deepcopy(model), args=_args(tmp_path, "ours", **kw),
                              train_dataset=Dataset.from_list(rows), processing_class=tok)
    trl = DPOTrainer(model=copy.deepcopy(model), args=_args(tmp_path, "trl", **kw),
                     train_dataset=Dataset.from_list(pairs), processing_class=tok)
    assert ours.ref_model is None  # no second copy: the model itself, before training, scored the pairs
    batch = ours.data_collator([dict(r) for r in ours.train_dataset])
    plain = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    for a, b in zip(ours.compute_ref_log_probs(ours.model, plain), trl.compute_ref_log_probs(trl.model, plain)):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    torch.testing.assert_close(batch["ref_chosen_logps"], ours.compute_ref_log_probs(ours.model, plain)[0],
                               rtol=0, atol=TOL)
    with torch.no_grad():
        for t in (ours, trl):
            for p in t.model.parameters():
                p.add_(0.01)
    _compare(_step(ours, batch), _step(trl, batch))


def test_lora_reference_is_the_base_with_the_adapter_disabled(tmp_path, chat_model):
    from chattune.config import LoraConfig
    from chattune.model import adapters

    model, tok = chat_model
    rows, _ = tokenize_pairs(tok, _pairs())
    args = _args(tmp_path, "ours")
    wrapped = adapters.wrap(copy.deepcopy(model), LoraConfig(enabled=True, r=4, alpha=8), [], "tiny", None, args)
    ours = ChattuneDPOTrainer(model=wrapped, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert ours.ref_model is None and list(ours.model.peft_config) == ["default"]  # no "ref" adapter copy
    torch.manual_seed(11)
    with torch.no_grad():  # a non-zero adapter, so the policy differs from its reference
        for n, p in ours.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    batch = ours.data_collator(rows)
    loss, grads, metrics = _step(ours, batch)
    assert grads and all("lora_" in n for n in grads) and abs(metrics["rewards/margins"]) > 1e-4
    base = frozen_copy(model)
    install_logprob_head(base)
    with torch.no_grad():
        expected = sequence_logprobs(base, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ref_chosen, ref_rejected = ours.compute_ref_log_probs(ours.model, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected, rtol=0, atol=TOL)
