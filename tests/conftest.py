"""Fixtures built in the test session: a tokenizer trained on a few lines, a 2-layer GPT-2 and a
data set laid out like HuggingFaceH4/ultrachat_200k. Nothing is fetched from the network."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from chattune.demo import addition, assets  # noqa: E402

LINES = [
    "hi there", "hello", "what is up", "the sky is blue", "you are kind",
    "what is 12 + 34", "12 + 34 = 46.", "be brief",
]
ROOT = Path(__file__).resolve().parents[1]  # the repository
SHARED_DATA = ROOT.parent / "shared" / "data"
# what every CLI run in the tests gets: no network, fixed hashing, no tokenizer thread warnings
# chat prompts the export tests render and run in both transformers and llama.cpp (system, multi-turn)
EXPORT_CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 34?"}],
    [{"role": "system", "content": "You are a careful calculator. Answer briefly."},
     {"role": "user", "content": "Please add 57 and 38."}],
    [{"role": "user", "content": "Add 23 and 41."}, {"role": "assistant", "content": "23 + 41 = 64."},
     {"role": "user", "content": "Now add 90 and 11."}],
]

CLI_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"}


def cli_command(*args, launcher: list[str] | None = None) -> list[str]:
    """The real CLI as a subprocess command line (python -m chattune ...), optionally under a launcher."""
    return [*(launcher or [sys.executable]), "-m", "chattune", *map(str, args)]


def cli_env(extra: dict | None = None) -> dict:
    return {**os.environ, **CLI_ENV, **(extra or {})}


def pytest_collection_modifyitems(config, items):
    """Everything under tests/integration runs the real CLI end to end: marked slow."""
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def run_cli():
    """Run `python -m chattune ARGS` to completion: run_cli(*args, timeout=600, env=None, launcher=None)."""

    def run(*args, timeout: float = 600, env: dict | None = None, launcher: list[str] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(cli_command(*args, launcher=launcher), capture_output=True, text=True,
                              env=cli_env(env), timeout=timeout, cwd=ROOT, input=stdin)

    return run


@pytest.fixture(scope="session")
def start_cli():
    """Start `python -m chattune ARGS` in the background, stderr to `log` (a pipe nobody reads could fill and
    block it): start_cli(*args, log=PATH, env=None) -> Popen."""

    def start(*args, log: Path, env: dict | None = None, **popen) -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen(cli_command(*args), stdout=subprocess.DEVNULL, stderr=f, env=cli_env(env),
                                    cwd=ROOT, **popen)

    return start


# the tests' tiny models run fastest on one thread, and on a busy machine more threads spin waiting for each
# other (30x slower measured under load); results do not depend on it
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread in this test process for a module (see ONE_THREAD); the previous count after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ServerProcess:
    """`python -m chattune serve` running in the background on a free loopback port; stdout and stderr go to
    `log`. `ready()` waits until it answers /health; `stop(sig)` returns its exit status."""

    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc, self.log, self.url = proc, log, None

    def ready(self, timeout: float = 300) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.url is None and (m := re.search(r" on (http://127\.0\.0\.1:\d+) ", self.log.read_text())):
                self.url = m.group(1)
            if self.url and self.get("/health", check=False) is not None:
                return self
            time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"the server did not start:\n{self.log.read_text()[-3000:]}")

    def get(self, path: str, check: bool = True) -> dict | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return json.loads(r.read())
        except OSError:
            if check:
                raise
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="session")
def start_server():
    """Start `python -m chattune serve MODEL --port 0 ARGS` (on one thread) in the background: start_server(model,
    *args, log=PATH, env=None) -> ServerProcess; call .ready() before using .url (other set-up can run while it
    loads)."""

    def start(model, *args, log: Path, env: dict | None = None) -> ServerProcess:
        with open(log, "w") as f:
            proc = subprocess.Popen(cli_command("serve", model, "--port", 0, *args), stdout=f, stderr=subprocess.STDOUT,
                                    env=cli_env({**ONE_THREAD, **(env or {})}), cwd=ROOT)
        return ServerProcess(proc, log)

    return start


@pytest.fixture(scope="session", autouse=True)
def prepared_cache(tmp_path_factory) -> Path:
    """Prepared (tokenized) data is cached under the session's temporary directory, never the user's."""
    d = tmp_path_factory.mktemp("chattune-cache")
    old = os.environ.get("CHATTUNE_CACHE")
    os.environ["CHATTUNE_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("CHATTUNE_CACHE", None)
    else:
        os.environ["CHATTUNE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    assets.train_tokenizer(LINES * 4, d, vocab_size=300)
    return d


@pytest.fixture()
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def splits():
    return addition.addition_splits(n_train=64, n_test=16, seed=1)


@pytest.fixture(scope="session")
def ultrachat_dir(tmp_path_factory, splits) -> Path:
    """A local data set laid out like the ultrachat_200k hub repo (train_gen/test_gen splits)."""
    return assets.write_hub_layout(splits, tmp_path_factory.mktemp("ultrachat"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, splits) -> Path:
    """A GPT-2-like model directory: no pad token, no chat template, safetensors weights."""
    d = tmp_path_factory.mktemp("gpt2-tiny")
    assets.build_base_model(d, splits, n_layer=2, n_embd=32, n_head=2, n_positions=128)
    return d


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, model_dir, ultrachat_dir) -> Path:
    """A chattune output directory: the tiny GPT-2 fine-tuned for a few dozen steps (report included)."""
    from chattune.commands.train import run_train
    from chattune.config import Config, validate

    cfg = Config()
    cfg.model.name = str(model_dir)
    cfg.data.dataset, cfg.data.train_split, cfg.data.eval_split = str(ultrachat_dir), "train_gen", "test_gen"
    out = tmp_path_factory.mktemp("trained") / "out"
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.lr, t.warmup = str(out), 60, 8, 3e-3, 0.1
    t.logging_steps, t.eval_steps, t.save_steps, t.group_by_length = 5, 30, 60, False
    run_train(validate(cfg))
    return out


def preference_rows(conversations: list[list[dict]]) -> list[dict]:
    """ultrafeedback_binarized rows from addition conversations: chosen is the conversation, rejected the same with
    the last sum off by ten; prompt (the first user turn), prompt_id, messages and the scores as on the hub."""
    rows = []
    for i, msgs in enumerate(conversations):
        right = addition.answer_of(msgs[-1]["content"])
        wrong = msgs[:-1] + [{"role": "assistant", "content": msgs[-1]["content"].replace(f"= {right}.",
                                                                                          f"= {right + 10}.")}]
        first_user = next(m["content"] for m in msgs if m["role"] == "user")
        rows.append({"prompt": first_user, "prompt_id": str(i), "chosen": msgs, "rejected": wrong, "messages": msgs,
                     "score_chosen": 9.0, "score_rejected": 2.0})
    return rows


@pytest.fixture(scope="session")
def ultrafeedback_dir(tmp_path_factory, splits) -> Path:
    """A local preference data set laid out like HuggingFaceH4/ultrafeedback_binarized (train_prefs/test_prefs)."""
    return assets.write_hub_layout({"train_prefs": preference_rows([r["messages"] for r in splits["train_gen"]]),
                                    "test_prefs": preference_rows([r["messages"] for r in splits["test_gen"]])},
                                   tmp_path_factory.mktemp("ultrafeedback"))


@pytest.fixture()
def chat_model(model_dir):
    """(model, tokenizer): the tiny GPT-2 with chattune's chat template and tokens, as `chattune train` prepares
    it (a fresh copy per test)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chattune.data.template import prepare_tokenizer
    from chattune.model.load import fit_model_to_tokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    setup = prepare_tokenizer(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    fit_model_to_tokenizer(model, tok, setup)
    return model, tok


TOOL_QUESTION = "What is 12 + 34?"
TOOL_RESULT = '{"result": 46}'
TOOL_ORDER = "Add 20 and 22."  # answered with a call alone: add(20, 22), then "The sum of 20 and 22 is 42."


@pytest.fixture(scope="session")
def tool_trained_dir(tmp_path_factory) -> Path:
    """A chattune output directory that has learnt one tool conversation by heart (a 2-layer GPT-2, 200 steps): given
    the add(a, b) tool and TOOL_QUESTION it says "Let me add them." and calls add with {"a": 12, "b": 34}; given the
    call's result it answers "The sum of 12 and 34 is 46."; TOOL_ORDER gets the call alone (add 20 and 22); "Hi!" gets
    "Hello! Ask me a sum." (no call)."""
    import random

    from chattune.commands.train import run_train
    from chattune.config import Config, validate
    from chattune.data.formats import from_messages
    from chattune.data.template import render_chatml
    from chattune.demo import tools

    turns = tools.call_turns(random.Random(0), 12, 34, 0)
    turns[0]["content"] = "Let me add them."
    rows = [{"messages": [{"role": "user", "content": TOOL_QUESTION}, *turns], "tools": [tools.ADD_TOOL]},
            {"messages": [{"role": "user", "content": TOOL_ORDER}, *tools.call_turns(random.Random(1), 20, 22, 0)],
             "tools": [tools.ADD_TOOL]},
            {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! Ask me a sum."}],
             "tools": [tools.ADD_TOOL]}]
    root = tmp_path_factory.mktemp("tool-model")
    data = assets.write_hub_layout({"train": rows * 24, "test": rows}, root / "data")
    texts = render_chatml([from_messages(r, {}) for r in rows], [[tools.ADD_TOOL]] * len(rows))[0]
    assets.build_base_model(root / "base", {}, texts=texts * 4, vocab_size=400, split_digits=False, n_layer=2,
                            n_embd=64, n_head=2, n_positions=512)
    cfg = Config()
    cfg.model.name = str(root / "base")
    cfg.data.dataset, cfg.data.train_split, cfg.data.eval_split, cfg.data.max_length = str(data), "train", "test", 512
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.lr, t.warmup = str(root / "out"), 200, 8, 3e-3, 0.1
    t.logging_steps, t.eval_steps, t.save_steps, t.group_by_length = 50, 200, 200, False
    run_train(validate(cfg))
    return root / "out"
