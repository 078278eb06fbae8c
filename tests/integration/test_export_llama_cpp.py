"""`chattune export` checked by llama.cpp itself (llama-cpp-python, the `export` extra): the real CLI exports the
session's trained model once per dtype, and llama.cpp, on the files, tokenizes chat text to transformers' ids,
predicts transformers' greedy tokens, names <|im_end|> as its eos and carries the chat template. Without
llama-cpp-python the llama.cpp checks skip and say why; the export itself is still run and checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chattune.artifacts.gguf import write_gguf
from chattune.artifacts.gguf_vocab import gguf_chat_template, llama_cpp_pretokenizer
from chattune.demo import addition
from chattune.demo.assets import texts_of, tiny_gpt2, train_tokenizer

from conftest import EXPORT_CONVERSATIONS as CONVERSATIONS

try:
    import llama_cpp
except ImportError as err:  # compiled from source by pip: many machines lack it
    llama_cpp, MISSING = None, (f"llama-cpp-python is not importable ({err}); install it with "
                                "pip install -e '.[export]' (compiles llama.cpp: 10-35 min)")
else:
    MISSING = ""
needs_llama = pytest.mark.skipif(llama_cpp is None, reason=MISSING)

ODD_TEXTS = ["it's  12345 apples,\n\n  don't!\t(x)  ", "héllo wörld 3.14 — ok?", "   \n  leading space",
             "I'M HERE'S it'LL  \r\n\r\n x", "a1b22c333d4444 ,,, ...!!!"]
DTYPES = ("f32", "f16", "q8_0")


@pytest.fixture(scope="module")
def exported(trained_dir, run_cli, tmp_path_factory) -> dict:
    """One real-CLI export per dtype; f16 as an Ollama model (GGUF + Modelfile), as Ollama users would take it."""
    out = tmp_path_factory.mktemp("export")
    runs = {}
    for dtype in DTYPES:
        fmt = "ollama" if dtype == "f16" else "gguf"
        r = run_cli("export", trained_dir, "--format", fmt, "--dtype", dtype, "--output-dir", out, "--name", "tiny")
        assert r.returncode == 0, r.stderr
        runs[dtype] = r.stdout
    return {"dir": out, "stdout": runs, **{dt: out / f"tiny-{dt}.gguf" for dt in DTYPES}}


@pytest.fixture(scope="module")
def trained(trained_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(trained_dir).eval(), AutoTokenizer.from_pretrained(trained_dir)


def load(path: Path, **kw):
    """llama.cpp on a file, with weight repacking ("extra buffer types") off: llama.cpp's AMX repack of q8_0
    weights segfaults on some Sapphire Rapids CPUs, this machine's included (ggml-org/llama.cpp#20824; the CLI's
    --no-repack). llama-cpp-python has no argument for it, so its default model params are patched. An f32 KV
    cache (llama.cpp's default is f16) lets f32 weights compute what transformers computes. One thread: ggml's
    threads spin while they wait, and on a busy machine two took 80 times as long as one here."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp.llama.llama_cpp, "llama_model_default_params", no_repack)
        return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, seed=0, verbose=False,
                               type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kw)


def prompts(tok) -> list[str]:
    return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]


def hf_greedy(model, ids: list[int], n: int, eos: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy continuation (ending at eos) and its logits at every position."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)
        return out[0, len(ids):].tolist(), model(out).logits[0].numpy()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        out.append(token)
        if token == llm.token_eos() or len(out) == n:
            break
    return out


def test_cli_writes_the_files_and_says_how_to_run_them(exported):
    out = exported["dir"]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "tiny-f16.gguf", "tiny-f32.gguf", "tiny-q8_0.gguf"]
    assert (out / "Modelfile").read_text().startswith("FROM ./tiny-f16.gguf\n")
    assert f"ollama create tiny -f {out / 'Modelfile'}" in exported["stdout"]["f16"]
    assert f"llama-cli -m {exported['f32']}" in exported["stdout"]["f32"]
    sizes = {dt: exported[dt].stat().st_size for dt in DTYPES}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]


@needs_llama
def test_metadata_names_the_chat_template_and_the_end_of_turn(trained, exported):
    _, tok = trained
    llm = load(exported["f32"], vocab_only=True)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert llm.token_eos() == im_end
    assert llm.metadata["tokenizer.chat_template"] == gguf_chat_template(tok.chat_template)
    assert llm.metadata["tokenizer.ggml.pre"] == "starcoder"
    assert int(llm.metadata["gpt2.context_length"]) == 128
    assert llm.n_vocab() == len(tok)
    assert llm.detokenize([im_end], special=True) == b"<|im_end|>"


def split_tokenizer(kind: str, chat_template: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from chattune.artifacts.gguf_vocab import SPLIT_REGEXES

    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama-bpe"))
    regex = {name: r for r, name in SPLIT_REGEXES.items()}[kind]
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = list(texts_of(addition.addition_splits(n_train=64, n_test=0, seed=2))) + ODD_TEXTS
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", chat_template=chat_template)


@needs_llama
@pytest.mark.parametrize("kind", ["starcoder", "gpt-2", "qwen2", "llama-bpe"])
def test_llama_cpp_tokenizes_like_transformers(trained, exported, kind, tmp_path):
    """Chat text with its special tokens, and text that stresses the pre-tokenizer, give transformers' ids:
    chattune's tokenizer (the exported file), GPT-2's own splitting, and the Split-regex families."""
    _, tok = trained
    path = exported["f32"]
    if kind == "gpt-2":
        texts = list(texts_of(addition.addition_splits(n_train=64, n_test=0, seed=2)))
        plain = train_tokenizer(texts, vocab_size=300, split_digits=False)
        plain.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        plain.chat_template, tok = tok.chat_template, plain
    elif kind != "starcoder":
        tok = split_tokenizer(kind, tok.chat_template)
    if kind != "starcoder":  # an untrained model is enough to carry the vocabulary
        path = write_gguf(tiny_gpt2(len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=64), tok,
                          tmp_path / "tok.gguf")
    assert llama_cpp_pretokenizer(tok) == kind
    llm = load(path, vocab_only=True)
    for text in prompts(tok) + ODD_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tok(text, add_special_tokens=False)["input_ids"], text


@needs_llama
def test_f32_greedy_tokens_and_logits_match_transformers(trained, exported):
    model, tok = trained
    llm = load(exported["f32"], logits_all=True)
    eos, worst = llm.token_eos(), 0.0
    for text in prompts(tok):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        want, hf_logits = hf_greedy(model, ids, 24, eos)
        assert llama_greedy(llm, ids, 24) == want
        diff = np.abs(llama_logits(llm, ids + want) - hf_logits).max()
        worst = max(worst, float(diff))
    print(f"f32: largest logit difference {worst:.2e}")
    # llama.cpp's GPT-2 uses ggml_gelu (the tanh form, from an f16 table); the tiny model's "gelu" is erf
    assert worst < 2e-3
    # llama-cpp-python's chat API formats with the file's template and stops at its eos
    reply = llm.create_chat_completion(CONVERSATIONS[0], temperature=0.0, max_tokens=24)["choices"][0]
    want, _ = hf_greedy(model, tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True,
                                                       return_dict=False), 24, eos)
    assert reply["message"]["content"] == tok.decode(want, skip_special_tokens=True)
    assert reply["finish_reason"] == ("stop" if want[-1] == eos else "length")
    # a reply that reaches <|im_end|> ends there, the token unseen (a few dozen steps rarely teach a 2-layer
    # model to stop within 24 tokens, so the end of turn is forced here)
    forced = llm.create_chat_completion(CONVERSATIONS[0], temperature=0.0, max_tokens=8, logit_bias={eos: 100.0})
    assert (forced["choices"][0]["finish_reason"], forced["choices"][0]["message"]["content"]) == ("stop", "")


# teacher-forced on transformers' greedy replies to the 3 prompts; measured here: see docs/export.md
@needs_llama
@pytest.mark.parametrize("dtype,floor", [("f16", 0.97), ("q8_0", 0.95)])
def test_f16_and_q8_0_agree_on_the_argmax(trained, exported, dtype, floor):
    model, tok = trained
    llm = load(exported[dtype], logits_all=True)
    same = total = 0
    for text in prompts(tok):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        want, hf_logits = hf_greedy(model, ids, 24, llm.token_eos())
        ours = llama_logits(llm, ids + want)
        reply = slice(len(ids) - 1, -1)  # the positions that predict the reply's tokens
        same += int((ours[reply].argmax(-1) == hf_logits[reply].argmax(-1)).sum())
        total += len(want)
    print(f"{dtype}: argmax agreement {same}/{total}")
    assert same / total >= floor


@needs_llama
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_llama_and_qwen2_layouts_run_in_llama_cpp(trained, model_type, tmp_path):
    """Random-weight Llama (q/k rows permuted for llama.cpp's rope, untied head) and Qwen2 (qkv biases)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, tok = trained
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    llm = load(write_gguf(model, tok, tmp_path / f"{model_type}.gguf", "f32"), logits_all=True)
    ids = tok(prompts(tok)[1], add_special_tokens=False)["input_ids"]
    want, hf_logits = hf_greedy(model, ids, 12, llm.token_eos())
    assert llama_greedy(llm, ids, 12) == want
    np.testing.assert_allclose(llama_logits(llm, ids + want), hf_logits, atol=1e-4)
