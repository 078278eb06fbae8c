"""Publishing a model directory: the exact folder to upload (an allow-list of files, local paths scrubbed,
the card added, no secret inside) and the upload itself, for `chattune push`.

Only the files a user of the model needs are uploaded (an allow-list: weights, configs, tokenizer
and template, chattune's config, metrics and report), never checkpoints, optimizer state, the
quickstart's base-model/ and data/, logs or rejected rows. The token is whatever huggingface_hub finds
(HF_TOKEN, or the login saved by `hf auth login`); chattune never takes it as an argument, never
prints it, and refuses to upload a file that contains it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from chattune.artifacts.card import build_card, hub_id, training_sources
from chattune.config import read_saved
from chattune.errors import ChattuneError
from chattune.model.manifest import check_complete
from chattune.outputs import ADAPTER_CONFIG_FILE, CONFIG_FILE, MODEL_CONFIG_FILE, REPORT_FILE, RESULTS_FILE

UPLOAD_PATTERNS = (
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "adapter_config.json",
    "chattune.yaml", "results.json", "metrics.jsonl", "report.md", "plots/*.png",
)
TOKEN_LIKE = re.compile(rb"hf_[A-Za-z0-9]{30,}")


def upload_files(model_dir: Path) -> list[Path]:
    """The files to upload, relative to model_dir."""
    check_complete(model_dir, content=True)  # never upload a model whose save did not finish, or a changed file
    if not (model_dir / MODEL_CONFIG_FILE).is_file() and not (model_dir / ADAPTER_CONFIG_FILE).is_file():
        raise ChattuneError(f"{model_dir} is not a model directory: it has no config.json")
    if not any(model_dir.glob("*.safetensors")):
        raise ChattuneError(f"{model_dir} has no .safetensors weights to upload")
    files = sorted({p.relative_to(model_dir) for pattern in UPLOAD_PATTERNS for p in model_dir.glob(pattern)
                    if p.is_file()})
    return files


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
    cfg = read_saved(model_dir)
    values = [(cfg.get("model") or {}).get("name"), (cfg.get("model") or {}).get("chat_template"),
              *(name for name, _ in training_sources(cfg.get("data") or {})),
              (cfg.get("train") or {}).get("output_dir"), str(model_dir)]
    pairs = {}
    for v in values:
        if isinstance(v, str) and v and not hub_id(v) and Path(v).name:
            for form in {v, str(Path(v).expanduser().resolve())}:
                if "/" in form or "\\" in form:
                    pairs[form] = Path(v).name
    home = str(Path.home())
    if len(home) > 1:
        pairs[home] = "~"
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))  # longest first: a parent must not cut a child


SCRUBBED = (CONFIG_FILE, RESULTS_FILE, REPORT_FILE)


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


def upload(src: Path, repo: str, private: bool, token: str | None) -> dict:
    """Create the repository if needed and upload the staged folder in one commit."""
    from huggingface_hub import HfApi

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
