"""chattune: turn a small pre-trained causal language model into a chat assistant.

The package is a stack of layers, and the one rule is that imports only go DOWN (a test checks it, imports
inside functions included):

    cli.py                 the command table
    commands/              one module per command: its arguments, its run(args), its Python entry (run_train ...)
    artifacts/, serving/   what a run leaves or offers: report, model card, publishing, export; the HTTP server
    evaluation/            scoring whole models: against a baseline, task scores
    training/, inference/  trainers, checkpoints, interrupts, metrics | generation, chat sessions
    model/                 loading (safetensors only), adapters, the selective LM head, speed-ups, memory
    data/, demo/           sources, formats, checks, template, tokens, cache | offline demo assets
    config.py, errors.py, outputs.py, verbosity.py   the schema, user-facing errors, shared names, library noise

A new command is a module in commands/ plus a line in cli.COMMANDS; library code it needs goes in the
lowest layer that can hold it. The stable entry points are re-exported here (loaded on first use, so
`import chattune` stays fast).
"""

__version__ = "0.1.0"

from chattune.config import Config  # noqa: E402
from chattune.errors import ChattuneError  # noqa: E402

# name -> module that defines it; imported on first access (these pull in torch and transformers)
_LAZY = {
    "run_train": "chattune.commands.train",
    "run_dpo": "chattune.commands.dpo",
    "run_eval": "chattune.commands.eval",
    "run_generate": "chattune.commands.generate",
    "run_chat": "chattune.commands.chat",
    "run_push": "chattune.commands.push",
    "run_export": "chattune.commands.export",
    "run_quickstart": "chattune.commands.quickstart",
    "run_server": "chattune.commands.serve",
    "ChatSession": "chattune.inference.chat",
    "generate_replies": "chattune.inference.generate",
    "load_chat_model": "chattune.model.load",
    "load_conversations": "chattune.data.loading",
    "load_training_data": "chattune.data.mixture",
    "prepare_training_data": "chattune.data.prepared",
    "merge_adapter": "chattune.model.adapters",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'chattune' has no attribute {name!r}")


__all__ = ["Config", "ChattuneError", "__version__", *_LAZY]
