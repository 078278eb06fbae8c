"""`chattune push`: upload a model directory to the Hugging Face hub with a generated model card.

Only the files a user of the model needs are uploaded (an allow-list: weights, configs, tokenizer and
template, chattune's config, metrics and report), never checkpoints, optimizer state, the quickstart's
base-model/ and data/, logs or rejected rows. The token is whatever huggingface_hub finds (HF_TOKEN, or the
login saved by `hf auth login`); chattune never takes it as an argument, never prints it, and refuses to
upload a file that contains it (or a string shaped like a hub token), or a link out of the model directory.
The run report quotes a few held-out conversations verbatim; push says so, and --no-samples leaves them out.
"""

from __future__ import annotations

from pathlib import Path

from chattune.errors import ChattuneError


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="the model directory to upload (a chattune output directory)")
    p.add_argument("--repo", required=True, metavar="NAME", help="hub repository: NAME or OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", action="store_true", help="write what would be uploaded to --output-dir instead")
    p.add_argument("--output-dir", metavar="DIR", help="with --dry-run: where to write the folder and its card")
    p.add_argument("--no-samples", action="store_true",
                   help="upload the report without its sample exchanges (they quote held-out conversations verbatim)")


def run(args) -> int:
    r = run_push(args.model, args.repo, private=args.private, dry_run=args.dry_run, output_dir=args.output_dir,
                 samples=not args.no_samples)
    if args.dry_run:
        print(f"dry run: the {len(r['files'])} files that would be uploaded, model card included, are in "
              f"{r['folder']} (nothing was uploaded)")
    else:
        print(f"uploaded {len(r['files'])} files to {r['url']}")
    if r["samples"]:
        n, where = r["samples"]
        print(f"note: report.md {'would quote' if args.dry_run else 'quotes'} {n} {where} conversation(s) verbatim in "
              "its sample exchanges; push again with --no-samples to leave them out")
    return 0


def run_push(model_dir: str, repo: str, private: bool = False, dry_run: bool = False,
             output_dir: str | None = None, samples: bool = True) -> dict:
    """Upload MODEL_DIR to the hub as REPO (or, with dry_run, write the folder to output_dir). The result has
    'files', 'url' or 'folder', and 'samples': (count, 'held-out' or 'training') of the conversations the
    uploaded report quotes verbatim, or None."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    from chattune.artifacts.card import samples_in_report
    from chattune.artifacts.publish import stage, upload

    src = Path(model_dir)
    if not src.is_dir():
        raise ChattuneError(f"model directory not found: {model_dir}")
    try:
        validate_repo_id(repo)
    except Exception as e:
        raise ChattuneError(f"--repo {repo!r} is not a valid hub repository name: {str(e).splitlines()[0]}") from None
    token = get_token()  # HF_TOKEN or the saved login; only used to check files, never shown
    quoted = samples_in_report(src) if samples else (0, "")
    quoted = quoted if quoted[0] else None
    if dry_run:
        if not output_dir:
            raise ChattuneError("--dry-run needs --output-dir DIR: where to write the folder that would be uploaded")
        dest = Path(output_dir)
        if dest.exists() and not dest.is_dir():
            raise ChattuneError(f"--output-dir {dest} is a file; give an empty or new directory")
        if dest.exists() and any(dest.iterdir()):
            raise ChattuneError(f"{dest} is not empty; give an empty or new --output-dir")
        return {"folder": str(dest), "files": stage(src, dest, repo, token, samples), "samples": quoted}
    if output_dir:
        raise ChattuneError("--output-dir is only for --dry-run")
    if not token:
        raise ChattuneError("no Hugging Face token: set HF_TOKEN in the environment or run `hf auth login`, then retry")
    return {**upload(src, repo, private, token, samples), "samples": quoted}
