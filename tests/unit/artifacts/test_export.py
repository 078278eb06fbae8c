"""The GGUF writer and the Ollama Modelfile, read back with the gguf package's reader: metadata, tokens and
their types, tensors in llama.cpp's layout and types, the pre-tokenizer mapping and what it refuses, atomic
writes, and (with Go installed) the Modelfile's TEMPLATE rendered by Go's text/template, Ollama's engine.
llama.cpp itself runs the files in tests/integration/test_export_llama_cpp.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import gguf
import numpy as np
import pytest
import torch
from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from chattune.artifacts import gguf_vocab
from chattune.artifacts.gguf import encode, write_gguf
from chattune.artifacts.ollama import ollama_modelfile, ollama_template, write_modelfile
from chattune.demo import addition
from chattune.demo.assets import texts_of, tiny_gpt2, train_tokenizer
from chattune.errors import ChattuneError

from conftest import EXPORT_CONVERSATIONS as CONVERSATIONS


@pytest.fixture(scope="module")
def trained(trained_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(trained_dir).eval(), AutoTokenizer.from_pretrained(trained_dir)


@pytest.fixture(scope="module")
def written(trained, tmp_path_factory):
    """The trained model written once per dtype, read back."""
    model, tok = trained
    out = tmp_path_factory.mktemp("gguf")
    return {dt: gguf.GGUFReader(write_gguf(model, tok, out / f"m-{dt}.gguf", dtype=dt)) for dt in ("f32", "f16",
                                                                                                    "q8_0")}


def field(reader, key):
    return reader.fields[key].contents()


def split_tokenizer(kind: str, chat_template: str, ignore_merges: bool | None = None):
    """A tiny byte-level BPE tokenizer with Qwen2's or Llama 3's Split regex, ChatML tokens added."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    regex = {name: r for r, name in gguf_vocab.SPLIT_REGEXES.items()}[kind]
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama-bpe" if ignore_merges is None else ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts_of(addition.addition_splits(n_train=32, n_test=0, seed=2))),
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                 "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", chat_template=chat_template)


def test_metadata_names_the_model_the_end_of_turn_and_the_template(trained, written):
    model, tok = trained
    r = written["f32"]
    assert field(r, "general.architecture") == "gpt2"
    assert field(r, "gpt2.context_length") == model.config.n_positions
    assert field(r, "gpt2.block_count") == model.config.n_layer
    assert field(r, "gpt2.embedding_length") == model.config.n_embd
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "starcoder"  # chattune's tokenizer: digits one by one, then GPT-2's
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert field(r, "tokenizer.ggml.eos_token_id") == im_end == model.generation_config.eos_token_id
    assert field(r, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    template = field(r, "tokenizer.chat_template")
    assert template == gguf_vocab.gguf_chat_template(tok.chat_template) and "endgeneration" not in template
    assert field(r, "general.file_type") == gguf.LlamaFileType.ALL_F32


def test_tokens_types_and_merges_are_the_tokenizers(trained, written):
    _, tok = trained
    r = written["f16"]
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    special = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == special
    calls = {tok.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>")}  # added, not special
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.USER_DEFINED} == calls
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in special | calls)
    spec = json.loads(tok.backend_tokenizer.to_str())
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m
                                                 for m in spec["model"]["merges"]]


def test_tensors_are_in_llama_cpps_layout_and_types(trained, written):
    model, _ = trained
    tensors = {dt: {t.name: t for t in r.tensors} for dt, r in written.items()}
    assert "output.weight" not in tensors["f32"]  # the tied head: llama.cpp reuses token_embd
    n_layer = model.config.n_layer
    assert len(tensors["f32"]) == 4 + 12 * n_layer  # embeddings, final norm, 12 per block
    qkv = tensors["f32"]["blk.0.attn_qkv.weight"]
    want = model.transformer.h[0].attn.c_attn.weight.detach().numpy().T  # Conv1D [in, out] -> [out, in]
    np.testing.assert_array_equal(np.asarray(qkv.data).reshape(want.shape), want)
    types = {dt: {name: t.tensor_type for name, t in ts.items()} for dt, ts in tensors.items()}
    Q = gguf.GGMLQuantizationType
    for name in ("token_embd.weight", "blk.0.attn_qkv.weight", "blk.1.ffn_down.weight"):
        assert (types["f16"][name], types["q8_0"][name]) == (Q.F16, Q.Q8_0), name
    for name in ("position_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_qkv.bias", "output_norm.bias"):
        assert types["f16"][name] == types["q8_0"][name] == Q.F32, name


def test_q8_0_only_for_rows_of_whole_blocks():
    rows = np.ones((4, 48), dtype=np.float32)  # 48 is not a multiple of the 32-value block
    assert encode("blk.0.ffn_up.weight", rows, "q8_0")[1] == gguf.GGMLQuantizationType.F16
    assert encode("blk.0.ffn_up.weight", np.ones((4, 64), np.float32), "q8_0")[1] == gguf.GGMLQuantizationType.Q8_0
    assert encode("blk.0.ffn_up.bias", np.ones(64, np.float32), "q8_0")[1] == gguf.GGMLQuantizationType.F32


def test_neutralised_template_renders_the_same_text(trained):
    _, tok = trained
    exported = gguf_vocab.gguf_chat_template(tok.chat_template)
    assert "{%- if true -%}" in exported and "{%- endif -%}" in exported
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # plain jinja, no transformers tags
    with pytest.raises(TemplateSyntaxError, match="generation"):
        env.from_string(tok.chat_template)
    for conv in CONVERSATIONS + [CONVERSATIONS[2] + [{"role": "assistant", "content": "90 + 11 = 101."}]]:
        for gen in (True, False):
            assert env.from_string(exported).render(messages=conv, add_generation_prompt=gen) == \
                tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert gguf_vocab.gguf_chat_template({"default": "{{ x }}", "tool_use": "y"}) == "{{ x }}"
    assert gguf_vocab.gguf_chat_template(None) is None


def test_a_tool_models_gguf_keeps_its_tool_template_and_call_tags(tool_trained_dir, tmp_path):
    """The GGUF of a model trained on tool data carries the template's tool layout: llama-cpp-python's renderer
    (the export extra; it gives jinja transformers' tojson) renders definitions, calls and results from the file as
    transformers does, and the call tags are user-defined tokens (llama.cpp matches them whole and prints them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chattune.demo.tools import ADD_TOOL

    llama_format = pytest.importorskip("llama_cpp.llama_chat_format")
    model, tok = AutoModelForCausalLM.from_pretrained(tool_trained_dir), AutoTokenizer.from_pretrained(tool_trained_dir)
    r = gguf.GGUFReader(write_gguf(model.eval(), tok, tmp_path / "tools.gguf", dtype="f32"))
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert [types[tokens.index(t)] for t in ("<tool_call>", "</tool_call>")] == [gguf.TokenType.USER_DEFINED] * 2
    conv = [{"role": "user", "content": "What is 12 + 34?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 34}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"result": 46}'}]
    fmt = llama_format.Jinja2ChatFormatter(field(r, "tokenizer.chat_template"), eos_token="<|im_end|>",
                                           bos_token="<|endoftext|>")
    prompt = fmt(messages=conv, tools=[ADD_TOOL]).prompt
    assert prompt == tok.apply_chat_template(conv, tools=[ADD_TOOL], tokenize=False, add_generation_prompt=True)
    assert '<tools>\n{"type": "function", "function": {"name": "add"' in prompt and "<tool_response>" in prompt


def test_pretokenizer_mapping(trained):
    _, tok = trained
    texts = list(texts_of(addition.addition_splits(n_train=32, n_test=0, seed=2)))
    assert gguf_vocab.llama_cpp_pretokenizer(tok) == "starcoder"
    assert gguf_vocab.llama_cpp_pretokenizer(train_tokenizer(texts, vocab_size=300, split_digits=False)) == "gpt-2"
    for kind in ("qwen2", "llama-bpe"):
        assert gguf_vocab.llama_cpp_pretokenizer(split_tokenizer(kind, tok.chat_template)) == kind


def test_tokenizers_llama_cpp_would_split_differently_are_refused(trained, tmp_path):
    from tokenizers import normalizers, pre_tokenizers

    model, tok = trained
    cases = {"Whitespace": lambda t: setattr(t.backend_tokenizer, "pre_tokenizer", pre_tokenizers.Whitespace()),
             "Lowercase": lambda t: setattr(t.backend_tokenizer, "normalizer", normalizers.Lowercase()),
             "add_prefix_space": lambda t: setattr(t.backend_tokenizer, "pre_tokenizer",
                                                   pre_tokenizers.ByteLevel(add_prefix_space=True))}
    for what, change in cases.items():
        odd = tok.__class__.from_pretrained(tok.name_or_path)
        change(odd)
        with pytest.raises(ChattuneError, match="GGUF export: llama.cpp") as err:
            write_gguf(model, odd, tmp_path / "x.gguf")
        assert "\n" not in str(err.value), what
    with pytest.raises(ChattuneError, match="'qwen2' pre-tokenizer has ignore_merges=False, this tokenizer True"):
        gguf_vocab.llama_cpp_pretokenizer(split_tokenizer("qwen2", tok.chat_template, ignore_merges=True))
    with pytest.raises(ChattuneError, match="'llama-bpe' pre-tokenizer has ignore_merges=True"):
        gguf_vocab.llama_cpp_pretokenizer(split_tokenizer("llama-bpe", tok.chat_template, ignore_merges=False))
    assert not list(tmp_path.iterdir())  # a refused export leaves no file, not even a partial one


def test_unsupported_models_are_refused(trained, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model, tok = trained
    with pytest.raises(ChattuneError, match="dtype 'q4'"):
        write_gguf(model, tok, tmp_path / "x.gguf", dtype="q4")
    gptj = AutoModelForCausalLM.from_config(AutoConfig.for_model("gptj", vocab_size=len(tok), n_embd=32,
                                                                 n_layer=1, n_head=2, rotary_dim=8))
    with pytest.raises(ChattuneError, match="supports gpt2, llama, qwen2 models; GPTJForCausalLM is 'gptj'"):
        write_gguf(gptj, tok, tmp_path / "x.gguf")
    relu = tiny_gpt2(len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=64)
    relu.config.activation_function = "relu"
    with pytest.raises(ChattuneError, match="activation 'relu', which llama.cpp's gpt2 does not run"):
        write_gguf(relu, tok, tmp_path / "x.gguf")
    lora = get_peft_model(tiny_gpt2(len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=64),
                          LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ChattuneError, match="LoRA adapter merged"):
        write_gguf(lora, tok, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_padded_vocab_gets_unused_placeholders(trained, tmp_path):
    model, tok = trained
    bigger = model.__class__(model.config)
    bigger.load_state_dict(model.state_dict())
    bigger.resize_token_embeddings(len(tok) + 6)
    r = gguf.GGUFReader(write_gguf(bigger, tok, tmp_path / "pad.gguf"))
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(tok) + 6 and tokens[-1] == f"[PAD{len(tok) + 5}]"
    assert types[-1] == gguf.TokenType.UNUSED and types[len(tok) - 1] != gguf.TokenType.UNUSED


def test_writes_are_atomic_and_never_overwrite_unasked(trained, tmp_path, monkeypatch):
    model, tok = trained
    path = tmp_path / "m.gguf"
    path.write_bytes(b"keep me")
    with pytest.raises(ChattuneError, match="m.gguf already exists; pass --overwrite"):
        write_gguf(model, tok, path)
    assert path.read_bytes() == b"keep me"

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
        with pytest.raises(ChattuneError, match="writing .*m.gguf failed: No space left on device"):
            write_gguf(model, tok, path, overwrite=True)
    assert path.read_bytes() == b"keep me"  # the old file stays whole; no temporary file is left behind
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    write_gguf(model, tok, path, overwrite=True)
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "gpt2"


def test_ollama_modelfile(trained, tmp_path):
    _, tok = trained
    text = ollama_modelfile("tiny-f16.gguf", tok, 128, system="You are a careful calculator.")
    lines = text.splitlines()
    assert lines[0] == "FROM ./tiny-f16.gguf" and lines[1].startswith('TEMPLATE """')
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER num_ctx 128" in lines
    assert lines[-1] == 'SYSTEM """You are a careful calculator."""'
    assert "SYSTEM" not in ollama_modelfile("x.gguf", tok, 1 << 15) and "num_ctx 4096" in ollama_modelfile(
        "x.gguf", tok, 1 << 15)
    with pytest.raises(ChattuneError, match='contains """'):
        ollama_modelfile("x.gguf", tok, 128, system='say """hi"""')
    other = tok.__class__.from_pretrained(tok.name_or_path)
    other.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ChattuneError, match="chat template is not ChatML"):
        ollama_modelfile("x.gguf", other, 128)
    other.chat_template = None
    with pytest.raises(ChattuneError, match="chat template is not ChatML"):
        ollama_modelfile("x.gguf", other, 128)
    path = write_modelfile(tmp_path / "Modelfile", text)
    assert path.read_text() == text
    with pytest.raises(ChattuneError, match="already exists"):
        write_modelfile(path, "x")


GO_RENDER = """package main

import ("encoding/json"; "os"; "text/template")

type Message struct { Role, Content string }

func main() {
	var data struct{ Messages []Message }
	if err := json.NewDecoder(os.Stdin).Decode(&data); err != nil { panic(err) }
	t := template.Must(template.New("t").Parse(os.Args[1]))
	if err := t.Execute(os.Stdout, data); err != nil { panic(err) }
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="go is not installed (Ollama's templates are Go templates; "
                                                        "Debian: apt-get install golang-go)")
def test_ollama_template_renders_like_the_chat_template(trained, tmp_path):
    """Go's text/template, Ollama's engine, renders the TEMPLATE to the text transformers renders."""
    _, tok = trained
    (tmp_path / "render.go").write_text(GO_RENDER)
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GO111MODULE": "off", "GOFLAGS": ""}
    subprocess.run(["go", "build", "-o", str(tmp_path / "render"), str(tmp_path / "render.go")], check=True, env=env)
    for conv in CONVERSATIONS:
        data = json.dumps({"Messages": [{"Role": m["role"], "Content": m["content"]} for m in conv]})
        got = subprocess.run([str(tmp_path / "render"), ollama_template(tok)], input=data, capture_output=True,
                             text=True, check=True).stdout
        assert got == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def test_llama_rope_rows_are_interleaved_per_head(trained, tmp_path):
    """transformers' Llama rotates half-heads, llama.cpp adjacent pairs: q/k rows are permuted, v rows are not
    (llama.cpp running the file is the integration test's job)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, tok = trained
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    tensors = {t.name: t for t in gguf.GGUFReader(write_gguf(model, tok, tmp_path / "l.gguf", "f32")).tensors}
    attn = model.model.layers[0].self_attn
    head = 8  # 32 / 4
    q = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(32, 32)
    hf_q = attn.q_proj.weight.detach().numpy()
    # row 1 of llama.cpp's head 0 is row head/2 of transformers' (the first of the second half)
    np.testing.assert_array_equal(q[1], hf_q[head // 2])
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_v.weight"].data).reshape(16, 32),
                                  attn.v_proj.weight.detach().numpy())
    assert "output.weight" in tensors  # an untied head is written
