"""Publishing a model directory: the exact folder to upload (an allow-list of files, local paths scrubbed,
the card added, no secret inside) and the upload itself, for `chattune push`.

Only the files a user of the model needs are uploaded (an allow-list: weights, configs, tokenizer
and template, chattune's config, metrics and report), never checkpoints, optimizer state, the
quickstart's base-model/ and data/, logs or rejected rows. Only regular files inside the model
directory are read: a link that leads out of it is refused. The token is whatever huggingface_hub finds
(HF_TOKEN, or the login saved by `hf auth login`); chattune never takes it as an argument, never prints
it, and refuses to upload anything that contains it or a string shaped like a hub token, checking every
file (safetensors: its JSON header) and the generated card before anything is written.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from pathlib import Path

from chattune.artifacts.card import build_card, hub_id, local_path, training_sources
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
# hub tokens are hf_ and 34 letters and digits today; 20 or more catches them without relying on that length
TOKEN_LIKE = re.compile(rb"hf_[A-Za-z0-9]{20,}")
MAX_HEADER = 100 << 20  # a safetensors JSON header larger than this is not a real one


def upload_files(model_dir: Path) -> list[Path]:
    """The files to upload, relative to model_dir: regular files of the allow-list, none reached through a
    link that leads out of the model directory (a vocab.json linked to a secret would upload the secret)."""
    check_complete(model_dir, content=True)  # never upload a model whose save did not finish, or a changed file
    if not (model_dir / MODEL_CONFIG_FILE).is_file() and not (model_dir / ADAPTER_CONFIG_FILE).is_file():
        raise ChattuneError(f"{model_dir} is not a model directory: it has no config.json")
    if not any(model_dir.glob("*.safetensors")):
        raise ChattuneError(f"{model_dir} has no .safetensors weights to upload")
    files = sorted({p.relative_to(model_dir) for pattern in UPLOAD_PATTERNS for p in model_dir.glob(pattern)
                    if p.is_file()})
    root = model_dir.resolve()
    for rel in files:
        target = (model_dir / rel).resolve()
        if not target.is_relative_to(root):
            raise ChattuneError(f"refusing to upload: {rel} is a link to {target}, outside {model_dir}; copy the "
                                "file into the model directory if it belongs to the model")
    return files


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (tensor names, shapes and the free-form __metadata__), where text
    such as a token can hide; the tensor bytes after it are numbers and are not read."""
    with open(path, "rb") as f:
        raw = f.read(8)
        size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < size <= min(MAX_HEADER, path.stat().st_size - 8):
            raise ChattuneError(f"refusing to upload: {path.name} is not a valid safetensors file (its header "
                                "length is wrong); save the weights again")
        return f.read(size)


def _check_no_secret(model_dir: Path, files: list[Path], texts: dict[str, str], token: str | None) -> None:
    """Refuse the upload when a file or a generated text holds the token or anything shaped like a hub token.
    Runs before anything is staged, on what would be uploaded: rewritten texts as rewritten."""
    def blobs():
        for rel in files:
            name = str(rel)
            if name in texts:
                continue
            yield name, _safetensors_header(model_dir / rel) if rel.suffix == ".safetensors" else \
                (model_dir / rel).read_bytes()
        for name, text in texts.items():
            yield name, text.encode()

    for name, blob in blobs():
        if (token and token.encode() in blob) or TOKEN_LIKE.search(blob):
            raise ChattuneError(f"refusing to upload: {name} contains a Hugging Face token (or something shaped like "
                                "one, hf_ and 20 or more letters or digits); remove it from the file and retry")


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
SAMPLES_LEFT_OUT = ("_The sample exchanges were left out of this copy of the report (`chattune push --no-samples`): "
                    "they quote the data verbatim._\n\n")


def strip_samples(report: str) -> str:
    """The run report without its sample exchanges (the section up to the next heading)."""
    return re.sub(r"## Sample exchanges\n.*?(?=^## )", lambda m: SAMPLES_LEFT_OUT, report, count=1,
                  flags=re.DOTALL | re.MULTILINE)


def _adapter_config(text: str) -> str:
    """adapter_config.json as the hub should see it: a base model that was a local directory is named by its
    last part (the card says it must be supplied); a hub id stays as it is."""
    config = json.loads(text)
    base = config.get("base_model_name_or_path")
    if local_path(base):
        config["base_model_name_or_path"] = Path(base).name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _rewritten(model_dir: Path, files: list[Path], samples: bool) -> dict[str, str]:
    """The uploaded files whose text chattune rewrites: local paths cut to their last part, an adapter's base
    named as the hub knows it, the report without its samples when asked."""
    replacements = _path_replacements(model_dir)
    out = {}
    for rel in files:
        name = str(rel)
        if name not in (*SCRUBBED, ADAPTER_CONFIG_FILE):
            continue
        text = (model_dir / rel).read_text(encoding="utf-8", errors="replace")
        if name == ADAPTER_CONFIG_FILE:
            try:
                text = _adapter_config(text)
            except (ValueError, AttributeError):
                raise ChattuneError(f"{model_dir / name} is not readable JSON; save the adapter again") from None
        if name == REPORT_FILE and not samples:
            text = strip_samples(text)
        for local, short in replacements:
            text = text.replace(local, short)
        out[name] = text
    return out


def stage(model_dir: Path, dest: Path, repo_id: str, token: str | None = None, samples: bool = True) -> list[str]:
    """Write the exact folder that is uploaded: the allowed files, rewritten where needed, and README.md (the
    card). Everything is checked first; nothing is left in dest when writing fails."""
    files = upload_files(model_dir)
    texts = _rewritten(model_dir, files, samples)
    texts["README.md"] = build_card(model_dir, repo_id, samples=samples)
    _check_no_secret(model_dir, files, texts, token)
    created = not dest.exists()
    written: list[Path] = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for rel in files:
            if str(rel) not in texts:
                written.append(dest / rel)
                written[-1].parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(model_dir / rel, written[-1])  # the content: a link inside the dir becomes a file
        for name, text in texts.items():
            written.append(dest / name)
            written[-1].write_text(text)
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for path in written:
                path.unlink(missing_ok=True)
        raise
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


def upload(src: Path, repo: str, private: bool, token: str | None, samples: bool = True) -> dict:
    """Create the repository if needed and upload the staged folder in one commit. The folder is staged (and
    so checked: links, tokens) before any network call."""
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="chattune-push-") as tmp:
        folder = Path(tmp) / "upload"
        files = stage(src, folder, repo, token, samples)
        try:
            url = api.create_repo(repo, private=private or None, exist_ok=True)
            if url.repo_id != repo:  # NAME became OWNER/NAME: only the card changes (its code names the full id)
                card = build_card(src, url.repo_id, samples=samples)
                _check_no_secret(src, [], {"README.md": card}, token)
                (folder / "README.md").write_text(card)
            api.upload_folder(repo_id=url.repo_id, folder_path=str(folder),
                              commit_message="Upload model trained with chattune")
        except ChattuneError:
            raise
        except Exception as e:
            raise _hub_error(e, repo) from e
    return {"url": str(url), "files": files}
