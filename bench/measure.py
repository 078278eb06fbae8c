"""What the training-speed benchmark measures, the same way for every recipe.

`Meter` is added to every Trainer's default callbacks (transformers.trainer.DEFAULT_CALLBACKS), so
the tutorial's Trainer, TRL's SFTTrainer and chattune's run all carry it without any change to
their code. At train start it puts a forward pre-hook on the model: each training forward is one
micro-batch, and the hook records its start time, its width (padded tokens) and, looked up by the
row's first tokens in a table built from the recipe's own tokenized rows, each row's real length
and assistant-token count. Throughput counts the micro-batches after the first `warmup` ones, from
the start of the first counted one to the start of the one after the last (so optimizer steps and
data loading between them are included). When the wall-clock budget is spent the hook stops the run
at the next micro-batch (raising BudgetSpent), and the model is evaluated as the last completed
optimizer step left it; a run that reaches its max_steps first is stopped the same way at train end.
"""

from __future__ import annotations

import resource
import time

import torch

KEY_TOKENS = 64


class BudgetSpent(Exception):
    pass


def row_key(ids) -> tuple:
    return tuple(int(t) for t in ids[:KEY_TOKENS])


class Meter:
    """A TrainerCallback (duck-typed: CallbackHandler calls the event methods it finds)."""

    def __init__(self, table: dict, budget_s: float, warmup: int, min_measured: int):
        self.table = table  # row_key -> (real length, assistant tokens)
        self.budget_s, self.warmup, self.min_measured = budget_s, warmup, min_measured
        self.starts, self.inputs = [], []  # per micro-batch: start time, input ids
        self.steps_done = 0
        self.t0 = self.t_end = None
        self.model = self.handle = None
        self.peak_rss_gib = None

    # --- the hook: one call per training micro-batch ------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        if not module.training:
            return
        measured = len(self.starts) - self.warmup
        if measured == 0:
            _sync()  # the window starts when the GPU has finished the warm-up
        now = time.perf_counter()
        if now - self.t0 >= self.budget_s and measured >= self.min_measured:
            _sync()
            self.t_end = time.perf_counter()
            raise BudgetSpent()
        self.starts.append(now)
        # kept as is: reading a GPU tensor here would make the CPU wait for the GPU at every micro-batch
        self.inputs.append(kwargs.get("input_ids", args[0] if args else None).detach())

    def _count(self, ids) -> tuple:
        width = real = assistant = missed = square = 0
        for row in ids.tolist():
            width += len(row)
            hit = self.table.get(row_key(row))
            if hit is None:
                missed += 1
                continue
            length = min(hit[0], len(row))
            real += length
            square += length * length
            assistant += hit[1]
        return width, real, assistant, missed, square

    # --- TrainerCallback events ----------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.handle = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_done = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self.t_end is None:
            _sync()
            self.t_end = time.perf_counter()
        raise BudgetSpent()  # skip what a recipe does after training (saving, reports): it is not measured

    def __getattr__(self, name):  # every other callback event is a no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def finish(self) -> dict:
        """Stop measuring; call once training has returned or raised BudgetSpent."""
        if self.t_end is None:
            _sync()
            self.t_end = time.perf_counter()
        if self.handle is not None:
            self.handle.remove()
        self.peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        counted = [self._count(ids) for ids in self.inputs[self.warmup:]]
        window = self.t_end - self.starts[self.warmup] if len(self.starts) > self.warmup else 0.0
        width, real, assistant, missed, square = (sum(b[i] for b in counted) for i in range(5))
        return {
            "train_seconds": self.t_end - self.t0, "micro_batches": len(self.starts), "steps": self.steps_done,
            "measured_micro_batches": len(counted), "window_seconds": window,
            "real_tokens": real, "padded_tokens": width, "assistant_tokens": assistant, "rows_not_found": missed,
            "real_tokens_per_s": real / window if window else None,
            "assistant_tokens_per_s": assistant / window if window else None,
            "padding_share": 1 - real / width if width else None,
            "token_weighted_row_length": square / real if real else None,
            "peak_rss_gib": self.peak_rss_gib,
            "threads": torch.get_num_threads(),
        }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def install(meter: Meter) -> None:
    """Make every Trainer built from now on in this process carry `meter`."""
    import transformers.trainer

    transformers.trainer.DEFAULT_CALLBACKS.append(meter)


def matmul_ceiling(n: int = 2048, reps: int = 5) -> float:
    """fp32 GFLOP/s of a square matmul with the default threads: the best of `reps`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def flops_per_token(shape: dict, mean_row_tokens: float, head_share: float) -> float:
    """Training FLOPs per real token: 6 x non-embedding weights (forward + backward matmuls), causal
    attention scores and values at this row length, and the LM head for the share of positions the
    recipe puts a loss on (all for the tutorial and TRL's defaults, assistant tokens for chattune).
    Embedding lookups, norms and elementwise work are not counted."""
    d, layers, vocab = shape["n_embd"], shape["n_layer"], shape["vocab_size"]
    body = 6 * 12 * layers * d * d
    attention = 6 * layers * d * mean_row_tokens  # 3 x (2 matmuls x 2 flops x d x mean causal span T/2)
    head = 6 * d * vocab * head_share
    return body + attention + head
