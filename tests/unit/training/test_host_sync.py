"""The training loop leaves the host off the device's critical path: what the collator knows on the host
(tokens, the mask decision, the loss positions) is not asked of the device again, the NaN guard reads its
flag only when a log, evaluation or save depends on it, and the loss stays exact with all of it, fixed shapes
included. Host reads are counted as the ops that make a GPU's host wait (a value read back, or an output
whose size depends on data): on a CPU the ops are the same, only the wait is not."""

from __future__ import annotations

import collections
import copy
import traceback

import pytest
import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerControl, TrainerState

from chattune.config import Config
from chattune.data.collate import HOST_KEYS, PadCollator, length_buckets, round_up
from chattune.data.template import prepare_tokenizer
from chattune.data.tokenize import encode_conversations
from chattune.training.interrupts import StepControl

# ops after which a GPU's host waits for the device
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::nonzero_static",
            "aten::_unique2", "aten::unique_dim", "aten::repeat_interleave"}


def _gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


@pytest.fixture()
def rows_and_tokenizer(tiny_tokenizer, splits):
    prepare_tokenizer(tiny_tokenizer)
    convs = [r["messages"] for r in splits["train_gen"][:24]]
    rows = encode_conversations(tiny_tokenizer, convs, max_length=96)
    return rows, tiny_tokenizer


def _items(rows, n=5):
    return [{"input_ids": i, "labels": lab} for i, lab in list(zip(rows["input_ids"], rows["labels"]))[:n]]


def _trainer(rows, tok, out, model=None, buckets=None, **train):
    from chattune.training.args import sft_args
    from chattune.training.trainer import ChattuneTrainer

    cfg = Config()
    cfg.train.output_dir, cfg.train.batch_size, cfg.train.lr = str(out), 4, 1e-3
    for k, v in train.items():
        setattr(cfg.train, k, v)
    args = sft_args(cfg, "fp32", False, use_cpu=True)
    return ChattuneTrainer(model=model or _gpt2(len(tok)), args=args, train_dataset=Dataset.from_dict(rows),
                           processing_class=tok,
                           data_collator=PadCollator(tok.pad_token_id, host_facts=True, buckets=buckets))


def test_collator_host_facts_equal_what_the_device_would_find(rows_and_tokenizer):
    rows, tok = rows_and_tokenizer
    items = _items(rows)
    plain = PadCollator(tok.pad_token_id)(items)
    assert not set(HOST_KEYS) & set(plain)  # evaluation and other callers get the plain batch
    batch = PadCollator(tok.pad_token_id, host_facts=True)(items)
    assert batch["num_tokens"] == int(plain["attention_mask"].sum())  # the Trainer's non-padding count
    targets = plain["labels"][:, 1:]
    rows_, cols = (targets != -100).nonzero(as_tuple=True)
    assert torch.equal(batch["loss_index"], rows_ * plain["labels"].shape[1] + cols)
    assert torch.equal(batch["loss_targets"], targets[rows_, cols])
    assert batch["mask_redundant"] is True


def test_buckets_fix_lengths_and_loss_rows(rows_and_tokenizer):
    rows, tok = rows_and_tokenizer
    buckets = length_buckets(96, smallest=16)
    assert buckets == (16, 24, 32, 48, 64, 96)
    assert [round_up(n, buckets) for n in (1, 16, 17, 50, 96, 97)] == [16, 16, 24, 64, 96, 192]
    shapes = set()
    for start in range(0, 20, 4):
        items = _items({k: v[start:] for k, v in rows.items()}, n=4)
        b = PadCollator(tok.pad_token_id, host_facts=True, buckets=buckets)(items)
        assert b["input_ids"].shape[1] in buckets
        k = int(b["loss_valid"].sum())
        assert k == sum(sum(1 for t in it["labels"][1:] if t != -100) for it in items)
        assert b["loss_index"].shape == b["loss_targets"].shape == b["loss_valid"].shape
        assert b["loss_valid"][:k].all() and not b["loss_valid"][k:].any()
        shapes.add((b["input_ids"].shape[1], b["loss_index"].shape[0]))
    assert len(shapes) <= 5


@pytest.mark.parametrize("buckets", [None, (16, 24, 32, 48, 64, 96)])
def test_loss_with_host_facts_equals_full_logits_cross_entropy(rows_and_tokenizer, tmp_path, buckets):
    rows, tok = rows_and_tokenizer
    items = _items(rows)
    batch = PadCollator(tok.pad_token_id, host_facts=True, buckets=buckets)(items)
    reference = _gpt2(len(tok))
    fast = copy.deepcopy(reference)
    ref = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    ref.backward()
    trainer = _trainer(rows, tok, tmp_path, model=fast, buckets=buckets)
    loss = trainer.compute_loss(fast, dict(batch))
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    want = {n: p.grad for n, p in reference.named_parameters()}
    for n, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_tokens_seen_counted_on_the_host_equal_the_devices_count(rows_and_tokenizer, tmp_path, monkeypatch):
    rows, tok = rows_and_tokenizer
    host = _trainer(rows, tok, tmp_path / "host", max_steps=3, logging_steps=1)
    host.train()
    from chattune.training.trainer import ChattuneTrainer

    monkeypatch.setattr(ChattuneTrainer, "_track_num_input_tokens", Trainer._track_num_input_tokens)
    device = _trainer(rows, tok, tmp_path / "device", max_steps=3, logging_steps=1)
    device.train()
    assert host.state.num_input_tokens_seen == device.state.num_input_tokens_seen > 0
    # evaluation runs through the same collator (host facts and all) and gives the same sums
    assert host.evaluate(Dataset.from_dict(rows))["eval_loss"] == device.evaluate(Dataset.from_dict(rows))["eval_loss"]
    assert ([r["loss"] for r in host.state.log_history if "loss" in r]
            == [r["loss"] for r in device.state.log_history if "loss" in r])


class _SyncCounter(TorchDispatchMode):
    """Counts host-waiting ops, except those on the collator's own host tensors (by construction on the CPU)."""

    def __init__(self):
        super().__init__()
        self.where = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNC_OPS:
            frames = traceback.extract_stack()[:-1]
            if not any(f.filename.endswith("chattune/data/collate.py") for f in frames):
                caller = next((f for f in reversed(frames) if "/torch/" not in f.filename), None)
                self.where[f"{name} {caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}" if caller else name] += 1
        return func(*args, **(kwargs or {}))


def test_no_host_read_per_micro_batch_outside_logging_steps(rows_and_tokenizer, tmp_path):
    from transformers import TrainerCallback

    rows, tok = rows_and_tokenizer
    counts: dict[int, collections.Counter] = {}

    class Window(TrainerCallback):
        # counts each optimizer step from its first micro-batch to the end of its callbacks and log
        def on_step_begin(self, args, state, control, **kw):
            self.mode = _SyncCounter()
            self.mode.__enter__()

        def on_log(self, args, state, control, logs=None, **kw):
            counts.setdefault(state.global_step, collections.Counter())["logged"] = 1

        def on_step_end(self, args, state, control, **kw):
            self.step = state.global_step

    window = Window()
    trainer = _trainer(rows, tok, tmp_path, max_steps=6, logging_steps=3, grad_accum=2, save_steps=100)
    trainer.args.optim = "adamw_torch_fused"  # what chattune picks on CUDA: step counters stay on the device
    trainer.args.logging_first_step = False
    trainer.add_callback(window)
    # the StepControl from `chattune train` (the NaN guard) is part of the loop
    control = StepControl()
    trainer.add_callback(control)
    original = trainer._maybe_log_save_evaluate

    def close_window(*a, **k):
        original(*a, **k)  # a logging step's reads happen here
        if getattr(window, "mode", None) is not None:  # (called once more after the last step)
            window.mode.__exit__(None, None, None)
            counts.setdefault(window.step, collections.Counter()).update(window.mode.where)
            window.mode = None

    trainer._maybe_log_save_evaluate = close_window
    trainer.train()
    assert sorted(counts) == [1, 2, 3, 4, 5, 6]
    for step, c in counts.items():
        reads = {k: v for k, v in c.items() if k != "logged"}
        if step % 3:
            assert not reads and "logged" not in c, (step, reads)
        else:  # the loss, the gradient norm and the NaN flag are read when logged: the counter does see reads
            assert reads and c["logged"], (step, c)
    assert control.reads == 2


def _step(ctl, step, loss, **flags):
    ctl.observe_loss(torch.tensor(loss))
    state = TrainerState(global_step=step, max_steps=100)
    control = TrainerControl(**flags)
    ctl.on_step_end(type("A", (), {"device": "cpu"})(), state, control)
    return control


def test_nonfinite_loss_is_read_at_the_next_log_and_names_its_step():
    ctl = StepControl()
    assert not _step(ctl, 1, 1.0).should_training_stop
    assert not _step(ctl, 2, float("nan")).should_training_stop  # no read yet: the host did not wait
    assert ctl.reads == 0 and ctl.nonfinite_step is None
    assert not _step(ctl, 3, float("inf")).should_training_stop
    control = _step(ctl, 4, 1.0, should_log=True)
    assert ctl.reads == 1 and ctl.nonfinite_step == 2
    assert control.should_training_stop and not control.should_save and not control.should_evaluate


def test_a_save_reads_the_flag_first_so_broken_weights_are_never_saved():
    ctl = StepControl()
    _step(ctl, 1, float("nan"))
    control = _step(ctl, 2, 1.0, should_save=True)
    assert ctl.nonfinite_step == 1 and not control.should_save and control.should_training_stop
    ctl = StepControl()
    _step(ctl, 1, 1.0)
    ctl.observe_loss(torch.tensor(float("nan")))
    control = TrainerControl(should_save=True)
    ctl.on_epoch_end(None, TrainerState(global_step=1), control)  # the epoch-end save
    assert ctl.nonfinite_step == 1 and not control.should_save


def test_a_signal_save_reads_the_flag_first():
    class Received:
        received = 15  # SIGTERM arrived

    ctl = StepControl()
    _step(ctl, 1, float("nan"))
    ctl.signals = Received()
    control = _step(ctl, 2, 1.0)  # not a logging step, but the signal asks for a save
    assert ctl.nonfinite_step == 1 and not control.should_save and control.should_training_stop


def test_cuda_only_settings_leave_a_cpu_run_unchanged(monkeypatch, tmp_path):
    from chattune.training import args as targs

    cfg = Config()
    cfg.train.output_dir = str(tmp_path)
    cpu = targs.sft_args(cfg, "fp32", False, use_cpu=True)
    from transformers import TrainingArguments

    assert cpu.optim == TrainingArguments(output_dir=str(tmp_path)).optim  # transformers' default, whatever it is
    assert cpu.dataloader_num_workers == 0 and not cpu.dataloader_pin_memory
    assert not cpu.accelerator_config.non_blocking
    monkeypatch.setattr(targs, "pick_device", lambda: "cuda")
    cuda = targs.sft_args(cfg, "fp32", False, use_cpu=False)
    assert cuda.optim.value == "adamw_torch_fused" and cuda.accelerator_config.non_blocking
    assert cuda.dataloader_pin_memory and cuda.dataloader_num_workers == targs.CUDA_WORKERS
    cfg.train.num_workers = 0  # asked for: kept
    assert targs.sft_args(cfg, "fp32", False, use_cpu=False).dataloader_num_workers == 0


def test_fixed_shapes_and_compile_reach_the_collator_and_the_trainer(tiny_tokenizer, tmp_path):
    from chattune.commands.train import training_collator
    from chattune.training.args import sft_args

    cfg = Config()
    cfg.data.max_length, cfg.train.output_dir = 256, str(tmp_path)
    assert training_collator(cfg, tiny_tokenizer, "cpu").buckets is None  # off by default
    assert training_collator(cfg, tiny_tokenizer, "cpu").host_facts
    cfg.train.fixed_shapes = True
    assert training_collator(cfg, tiny_tokenizer, "cpu").buckets == (64, 96, 128, 192, 256)
    cfg.train.fixed_shapes, cfg.train.compile = False, True
    assert training_collator(cfg, tiny_tokenizer, "cuda").buckets == (64, 96, 128, 192, 256)
    assert sft_args(cfg, "fp32", False, use_cpu=True).torch_compile
