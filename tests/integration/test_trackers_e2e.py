"""--report-to through the real CLI: TensorBoard event files hold the training and evaluation scalars, and
Weights & Biases (offline) and MLflow (a file store), where installed, record the same run with no network."""

from __future__ import annotations

import importlib.util

import pytest

TB_SCALARS = {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "eval/loss",
              "eval/perplexity", "eval/accuracy", "eval/tokens"}


def test_report_to_writes_train_and_eval_metrics(run_cli, model_dir, ultrachat_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = [t for t in ("wandb", "mlflow") if importlib.util.find_spec(t)]  # optional: tested where installed
    out = tmp_path / "tracked-run"
    # MLflow 3 wants a database by default (sqlite, through SQLAlchemy); its file store needs the opt-in
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    proc = run_cli("train", "--model", model_dir, "--dataset", ultrachat_dir, "--train-split", "train_gen",
                   "--eval-split", "test_gen", "--output-dir", out, "--max-steps", 4, "--batch-size", 8,
                   "--logging-steps", 1, "--eval-steps", 2, "--lr", "3e-3", "--no-eval-baseline",
                   "--report-to", ",".join(["tensorboard", *extra]), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = list((out / "runs").iterdir())
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert TB_SCALARS <= scalars, sorted(scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]  # the evaluation after training is not resent
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_second"))

    if "wandb" in extra:
        offline = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(offline) == 1 and offline[0].stat().st_size > 0
    if "mlflow" in extra:
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

        client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
        (run,) = client.search_runs(experiment_ids=["0"])
        assert run.info.run_name == "tracked-run"  # named after the output directory
        assert {"loss", "eval_loss", "tokens_per_second", "learning_rate"} <= set(run.data.metrics)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [2, 4]
