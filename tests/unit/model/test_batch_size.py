"""--batch-size auto: the decision logic against a fake memory limit (a probe that runs out of memory above it),
and what `auto` means without a GPU."""

from __future__ import annotations

import pytest

from chattune.config import Config, validate
from chattune.errors import ChattuneError, ConfigError
from chattune.model.batch_size import DEFAULT_MICRO, HEADROOM, Layout, auto_layout, choose_layout, divisors_desc

GiB = 2**30


def fake_gpu(limit: int, weights: int, per_row: int, estimate_error: float = 1.0):
    """A GPU with `limit` bytes: a probe of m rows peaks at weights + m * per_row, or runs out of memory."""
    probed = []

    def probe(m):
        probed.append(m)
        peak = weights + m * per_row
        return None if peak > limit else peak

    def estimate(m):
        return int((weights + m * per_row) * estimate_error)

    return probe, estimate, probed


def test_everything_fits_one_micro_batch_is_the_global_batch():
    probe, estimate, probed = fake_gpu(100 * GiB, GiB, GiB // 10)
    layout = choose_layout(16, 100 * GiB, estimate, probe)
    assert (layout.batch, layout.accum) == (16, 1) and probed == [16]
    assert "16 x accumulation 1 = 16" in layout.describe().replace("micro-batch ", "")


def test_the_estimate_skips_hopeless_sizes_and_an_out_of_memory_probe_backs_off():
    # 10 GiB card: 16 rows are over the estimate (not probed); the estimate is 30% optimistic, so 8 rows pass
    # it but run out of memory in the probe; 4 rows fit. The global batch stays 16.
    probe, estimate, probed = fake_gpu(10 * GiB, 2 * GiB, GiB, estimate_error=0.7)
    layout = choose_layout(16, 10 * GiB, estimate, probe)
    assert probed == [8, 4]
    assert (layout.batch, layout.accum) == (4, 4) and layout.batch * layout.accum == 16


def test_memory_the_probe_does_not_allocate_yet_counts_against_the_budget():
    probe, estimate, probed = fake_gpu(100 * GiB, GiB, GiB)
    # 8 rows peak at 9 GiB; with 3 GiB of optimizer state still to come, 9 + 3 > 0.9 * 12
    layout = choose_layout(8, 12 * GiB, lambda m: 0, probe, later_bytes=3 * GiB)
    assert (layout.batch, layout.accum) == (4, 2)
    assert 5 * GiB + 3 * GiB <= HEADROOM * 12 * GiB


def test_nothing_fits_says_what_to_do():
    probe, estimate, _ = fake_gpu(GiB, 2 * GiB, GiB)
    with pytest.raises(ChattuneError, match="gradient-checkpointing"):
        choose_layout(4, GiB, estimate, probe)


def test_divisors_keep_the_global_batch_exact():
    assert divisors_desc(12) == [12, 6, 4, 3, 2, 1]
    assert divisors_desc(1) == [1]


def test_auto_without_a_gpu_is_the_old_default_layout():
    cfg = Config()
    assert cfg.train.batch_size == "auto"
    cfg.train.grad_accum = 3
    layout = auto_layout(None, cfg, "cpu", "fp32", processes=1)
    assert layout == Layout(DEFAULT_MICRO, 3, "no GPU to probe")
    assert auto_layout(None, cfg, "cuda", "bf16", processes=2).batch == DEFAULT_MICRO  # ranks must agree: no probe


def test_config_takes_auto_or_a_number():
    cfg = Config()
    cfg.train.batch_size = "auto"
    validate(cfg)
    cfg.train.batch_size = "big"
    with pytest.raises(ConfigError, match="auto"):
        validate(cfg)
    cfg.train.batch_size = 0
    with pytest.raises(ConfigError):
        validate(cfg)
