"""An Ollama Modelfile for an exported GGUF file: FROM the file, a TEMPLATE that lays a conversation out as the
model's chat template does, the end-of-turn token as a stop, the context length, and an optional SYSTEM.

Ollama renders prompts with Go's text/template, not jinja, so the model's template cannot be copied in. The
TEMPLATE is written for ChatML (chattune's own layout) and is only written when the tokenizer's template is
proved to render a probe conversation exactly as ChatML; a test renders it with Go itself.
"""

from __future__ import annotations

from pathlib import Path

from chattune.artifacts.gguf import atomic_output
from chattune.artifacts.gguf_vocab import CHATML_END, CHATML_START
from chattune.errors import ChattuneError

MODELFILE = "Modelfile"
# Ollama's default context may exceed a small model's (GPT-2: 1024 learned positions); larger models get
# at most this much, what chattune trains at by default
MAX_NUM_CTX = 4096


def renders_chatml(tokenizer) -> bool:
    """Whether the tokenizer's chat template lays a conversation out as ChatML (chattune's template does)."""
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    want = "".join(f"{CHATML_START}{m['role']}\n{m['content']}{CHATML_END}\n" for m in probe)
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        got = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that rejects the probe (e.g. no system role) is not ChatML either
        return False
    return got == want + f"{CHATML_START}assistant\n"


def ollama_template(tokenizer) -> str:
    """A Go template rendering Ollama's .Messages as the ChatML template does with add_generation_prompt
    (Ollama sends the Modelfile's SYSTEM as a leading system message). A trailing assistant message is left
    open: Ollama's convention for continuing a reply."""
    if not renders_chatml(tokenizer):
        raise ChattuneError("Ollama export: the model's chat template is not ChatML (<|im_start|>ROLE ... <|im_end|>"
                            "), the only layout chattune writes a TEMPLATE for; use --format gguf (llama.cpp and LM "
                            "Studio read the template inside the file)")
    start, end = CHATML_START, CHATML_END
    return ("{{- range $i, $_ := .Messages }}\n"
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}" + start + "{{ .Role }}\n"
            "{{ .Content }}\n"
            "{{- if or (ne .Role \"assistant\") (not $last) }}" + end + "\n{{ end }}\n"
            "{{- if and $last (ne .Role \"assistant\") }}" + start + "assistant\n{{ end }}\n"
            "{{- end }}")


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ChattuneError('Ollama export: the system prompt contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def ollama_modelfile(gguf_name: str, tokenizer, context: int, system: str | None = None) -> str:
    """The Modelfile for a GGUF file lying next to it."""
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(ollama_template(tokenizer))}",
             f'PARAMETER stop "{CHATML_END}"', f"PARAMETER num_ctx {min(context, MAX_NUM_CTX)}"]
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    return "\n".join(lines) + "\n"


def write_modelfile(path: str | Path, text: str, overwrite: bool = False) -> Path:
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
