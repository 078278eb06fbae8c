"""`chattune push`: upload a model directory to the Hugging Face hub with a generated model card.

Only the files a user of the model needs are uploaded (an allow-list: weights, configs, tokenizer
and template, chattune's config, metrics and report), never checkpoints, optimizer state, the
quickstart's base-model/ and data/, logs or rejected rows. The token is whatever huggingface_hub finds
(HF_TOKEN, or the login saved by `hf auth login`); chattune never takes it as an argument, never
prints it, and refuses to upload a file that contains it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from chattune.errors import ChattuneError
from chattune.report import fmt_number

UPLOAD_PATTERNS = (
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "adapter_config.json",
    "chattune.yaml", "results.json", "metrics.jsonl", "report.md", "plots/*.png",
)
TOKEN_LIKE = re.compile(rb"hf_[A-Za-z0-9]{30,}")
_LOCAL = re.compile(r"^(\.|/|~)|^[A-Za-z]:\\")


def upload_files(model_dir: Path) -> list[Path]:
    """The files to upload, relative to model_dir."""
    if not (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").is_file():
        raise ChattuneError(f"{model_dir} is not a model directory: it has no config.json")
    if not any(model_dir.glob("*.safetensors")):
        raise ChattuneError(f"{model_dir} has no .safetensors weights to upload")
    files = sorted({p.relative_to(model_dir) for pattern in UPLOAD_PATTERNS for p in model_dir.glob(pattern)
                    if p.is_file()})
    return files


def _hub_id(name) -> str | None:
    """A name that can go in the card's metadata: a hub id, not a path on this machine."""
    if not isinstance(name, str) or not name or _LOCAL.search(name) or Path(name).expanduser().exists():
        return None
    return name if re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name) else None


def _describe(name, kind: str = "model") -> str:
    hub = _hub_id(name)
    if hub:
        return f"[`{hub}`](https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{hub})"
    # a local path: only its last part, since the rest is about this machine, not the model
    what = "local model directory" if kind == "model" else "local data set"
    return f"`{Path(str(name)).name}` (a {what})" if name else "unknown"


def _training_sources(d: dict) -> list[tuple[str, str | None]]:
    """(data set, training split) of each source in a saved config: --dataset, or every entry of a mix."""
    if d.get("dataset"):
        return [(d["dataset"], d.get("train_split"))]
    return [(e["dataset"], e.get("split") or d.get("train_split")) for e in d.get("datasets") or []
            if isinstance(e, dict) and e.get("dataset")]


def build_card(model_dir: Path, repo_id: str) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    cfg = {}
    if (model_dir / "chattune.yaml").is_file():
        cfg = yaml.safe_load((model_dir / "chattune.yaml").read_text()) or {}
    results = json.loads((model_dir / "results.json").read_text()) if (model_dir / "results.json").is_file() else {}
    m, d, t = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("train") or {}
    base, sources = m.get("name"), _training_sources(d)
    hub_sets = [h for h in dict.fromkeys(_hub_id(name) for name, _ in sources) if h]
    adapter = (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file()
    data = ModelCardData(library_name="peft" if adapter else "transformers", pipeline_tag="text-generation",
                         base_model=_hub_id(base), datasets=hub_sets or None,
                         tags=["chattune", "trl", "sft", "conversational"] + (["lora"] if adapter else []))
    name = repo_id.split("/")[-1]
    ds_text = (_describe(sources[0][0], "dataset") if len(sources) == 1 else
               "a mix of " + ", ".join(f"{_describe(n, 'dataset')} (split `{sp}`)" for n, sp in sources)
               if sources else "unknown")
    lines = [f"# {name}", "",
             f"A chat model fine-tuned with chattune from {_describe(base)} on "
             f"{ds_text}. Loss was computed on assistant replies only (each with its end-of-turn "
             "token), so the model learns to answer and to stop.", "", "## Training data", ""]
    if sources:
        if len(sources) == 1:
            splits = f"trained on split `{sources[0][1]}`" + (f", evaluated on `{d['eval_split']}`"
                                                              if d.get("eval_split") else "")
            lines.append(f"Data set: {ds_text}, {splits}.")
        else:
            lines.append(f"Data: {ds_text}.")
        stats = results.get("data") or {}
        for key in ("train", "eval"):
            s = stats.get(key)
            if s:
                lines.append(f"- {key}: {s['rows_out']} conversations, {s['tokens']} tokens "
                             f"({s['loss_tokens']} with loss), {s['truncated']} truncated to {results.get('max_length')}")
    else:
        lines.append("Not recorded (this directory has no chattune.yaml).")
    lines += ["", "## Training hyperparameters", ""]
    if t:
        runtime = (results.get("train") or {}).get("train_runtime")
        rows = [("base model", _describe(base)), ("epochs", t.get("epochs")), ("max steps", t.get("max_steps")),
                ("batch size per device", t.get("batch_size")), ("gradient accumulation", t.get("grad_accum")),
                ("learning rate", t.get("lr")), ("schedule", t.get("lr_scheduler")), ("warm-up", t.get("warmup")),
                ("weight decay", t.get("weight_decay")), ("max length", d.get("max_length")),
                ("precision", results.get("precision") or t.get("precision")), ("seed", t.get("seed")),
                ("steps run", (results.get("train") or {}).get("global_step")),
                ("training time (s)", runtime if runtime is None else fmt_number(float(runtime)))]
        lines += ["| setting | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
        lines += ["", "The full configuration is in `chattune.yaml`."]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Evaluation", ""]
    final, before = results.get("eval") or {}, results.get("baseline") or {}
    if final:
        lines += ["Measured on held-out conversations, per assistant token:", "",
                  "| metric | base model | this model |" if before else "| metric | this model |",
                  "| --- | --- | --- |" if before else "| --- | --- |"]
        for label, key in (("loss", "eval_loss"), ("perplexity", "eval_perplexity"),
                           ("next-token accuracy", "eval_accuracy"), ("tokens", "eval_tokens")):
            if key in final:
                pct = key == "eval_accuracy"
                cells = ([fmt_number(before.get(key), pct)] if before else []) + [fmt_number(final[key], pct)]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    else:
        lines.append("No evaluation was run.")
    task = model_dir / "eval.json"  # the quickstart's task score, before and after training
    if task.is_file():
        q = json.loads(task.read_text())
        if {"metric", "before", "after"} <= set(q):
            lines += ["", f"Task score `{q['metric']}` ({q.get('description', '')}): {q['before']:.1%} before "
                          f"training, {q['after']:.1%} after."]
    if (model_dir / "report.md").is_file():
        lines += ["", "Loss curves, sample exchanges and data statistics are in [report.md](report.md)."]
    lines += ["", "## How to chat with it", "", "With transformers (the chat template is saved with the tokenizer, and "
              "generation stops at its end-of-turn token):", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
              f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
              'messages = [{"role": "user", "content": "Hello! Who are you?"}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\","
              " return_dict=True)",
              "output = model.generate(**inputs, max_new_tokens=128, do_sample=True, temperature=0.7, top_p=0.9)",
              'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
              "```", "", f"Or in a terminal: `chattune chat {repo_id}`.", "", "## Limitations", "",
              f"- A small model fine-tuned on {ds_text}: it imitates that data's style and knows little "
              "beyond what its base model knew; expect factual errors and made-up answers.",
              "- It was not trained for safety, refusals or tool use beyond what the data contains; do not rely "
              "on it for advice or decisions that matter.",
              "- The evaluation numbers are next-token statistics on held-out data of the same kind, not a measure "
              "of general chat quality.",
              "- Conversations longer than the max length above were truncated in training; longer chats "
              "are outside what it learned."]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    return str(card)


def _check_no_secret(folder: Path, token: str | None) -> None:
    """Refuse to upload a file holding the token (or anything shaped like a hub token)."""
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            continue  # weights are numbers; a token cannot hide in them by accident
        blob = path.read_bytes()
        if (token and token.encode() in blob) or TOKEN_LIKE.search(blob):
            raise ChattuneError(f"refusing to upload: {path.relative_to(folder)} contains a Hugging Face token "
                                "(or something shaped like one); remove it from the file and retry")


def _path_replacements(model_dir: Path) -> list[tuple[str, str]]:
    """Local paths the run's files mention (base model, data, output directory) -> their last part:
    where a model was trained on this machine is nobody's business on the hub."""
    cfg = {}
    if (model_dir / "chattune.yaml").is_file():
        cfg = yaml.safe_load((model_dir / "chattune.yaml").read_text()) or {}
    values = [(cfg.get("model") or {}).get("name"), (cfg.get("model") or {}).get("chat_template"),
              *(name for name, _ in _training_sources(cfg.get("data") or {})),
              (cfg.get("train") or {}).get("output_dir"), str(model_dir)]
    pairs = {}
    for v in values:
        if isinstance(v, str) and v and not _hub_id(v) and Path(v).name:
            for form in {v, str(Path(v).expanduser().resolve())}:
                if "/" in form or "\\" in form:
                    pairs[form] = Path(v).name
    home = str(Path.home())
    if len(home) > 1:
        pairs[home] = "~"
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))  # longest first: a parent must not cut a child


SCRUBBED = ("chattune.yaml", "results.json", "report.md")


def stage(model_dir: Path, dest: Path, repo_id: str, token: str | None = None) -> list[str]:
    """Write the exact folder that is uploaded: the allowed files and README.md (the card)."""
    files = upload_files(model_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model_dir / rel, dest / rel)
    replacements = _path_replacements(model_dir)
    for name in SCRUBBED:
        if (dest / name).is_file():
            text = (dest / name).read_text()
            for local, short in replacements:
                text = text.replace(local, short)
            (dest / name).write_text(text)
    (dest / "README.md").write_text(build_card(model_dir, repo_id))
    _check_no_secret(dest, token)
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())


def _network_error(err: Exception) -> bool:
    names = {c.__name__ for c in type(err).__mro__}
    return isinstance(err, (ConnectionError, TimeoutError)) or bool(
        names & {"TransportError", "RequestError", "ConnectError", "TimeoutException", "NetworkError"})


def _hub_error(err: Exception, repo: str) -> ChattuneError:
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status == 401:
        return ChattuneError("the Hugging Face hub rejected the token (401): log in again with `hf auth login` or "
                             "set a valid HF_TOKEN")
    if isinstance(err, HfHubHTTPError) and status == 403:
        return ChattuneError(f"the token may not write to {repo} (403): use a token with write access, or a repo "
                             "in your own namespace")
    if _network_error(err):
        return ChattuneError("cannot reach the Hugging Face hub (no network, or HF_HUB_OFFLINE is set); nothing was "
                             "uploaded. Try again when online, or use --dry-run --output-dir DIR to see what "
                             "would be uploaded")
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ChattuneError(f"upload to {repo} failed: {first}")


def run_push(model_dir: str, repo: str, private: bool = False, dry_run: bool = False,
             output_dir: str | None = None) -> dict:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import validate_repo_id

    src = Path(model_dir)
    if not src.is_dir():
        raise ChattuneError(f"model directory not found: {model_dir}")
    try:
        validate_repo_id(repo)
    except Exception as e:
        raise ChattuneError(f"--repo {repo!r} is not a valid hub repository name: {str(e).splitlines()[0]}") from None
    token = get_token()  # HF_TOKEN or the saved login; only used to check files, never shown
    if dry_run:
        if not output_dir:
            raise ChattuneError("--dry-run needs --output-dir DIR: where to write the folder that would be uploaded")
        dest = Path(output_dir)
        if dest.exists() and any(dest.iterdir()):
            raise ChattuneError(f"{dest} is not empty; give an empty or new --output-dir")
        return {"folder": str(dest), "files": stage(src, dest, repo, token)}
    if output_dir:
        raise ChattuneError("--output-dir is only for --dry-run")
    if not token:
        raise ChattuneError("no Hugging Face token: set HF_TOKEN in the environment or run `hf auth login`, then retry")
    upload_files(src)  # a directory with nothing to upload fails before any network call
    api = HfApi()
    try:
        url = api.create_repo(repo, private=private or None, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="chattune-push-") as tmp:
            files = stage(src, Path(tmp), url.repo_id, token)
            api.upload_folder(repo_id=url.repo_id, folder_path=tmp, commit_message="Upload model trained with chattune")
    except ChattuneError:
        raise
    except Exception as e:
        raise _hub_error(e, repo) from e
    return {"url": str(url), "files": files}
