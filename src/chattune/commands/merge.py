"""`chattune merge`: a LoRA adapter merged into its base model, written as a standalone model directory."""

from __future__ import annotations

from chattune.verbosity import quiet


def add_arguments(p) -> None:
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="the output directory of a --lora or --qlora run")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where to write the merged model")
    p.add_argument("--trust-remote-code", action="store_true", help="run modelling code shipped with the base model")


@quiet
def run(args) -> int:
    from chattune.model.adapters import merge_adapter

    out = merge_adapter(args.adapter, args.output_dir, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {out}")
    return 0
