"""offload.chat_template against transformers 5's own chat-template rendering and tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offload.chat_template import ChatTemplate, load_chat_template
from offload.errors import TokenizerError
from offload.tokenizer import Message, Tokenizer
from tests.test_tokenizer import MIXTRAL_TEMPLATE
from tests.tokenizer_builder import write_tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_ADDED = {"512": "<|im_start|>", "513": "<|im_end|>"}

CONVERSATIONS = [
    [Message("user", "Hello there")],
    [Message("user", "What is 2+2?"), Message("assistant", "4."), Message("user", "And 3+3?")],
    [Message("system", "You are terse."), Message("user", "Name a colour."),
     Message("assistant", "Blue"), Message("user", "Another, in français: crème?")],
]


def _write(d: Path, template, **extra) -> Path:
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg.update(extra)
    cfg_path.write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return d


def _clone(base: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (dst / name).write_bytes((base / name).read_bytes())
    return dst


def _hf_render(template: str, messages, add_generation_prompt: bool, **special) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    chat = [{"role": m.role, "content": m.content} for m in messages]
    rendered, _ = render_jinja_template(conversations=[chat], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **special)
    return rendered[0]


def _hf_tokenizer(model_dir: Path, legacy: bool, added: dict[str, str], template: str):
    """transformers' LlamaTokenizer on the fixture's vocabulary, built without protobuf."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), legacy=legacy,
                         chat_template=template)
    for tid, content in sorted(added.items(), key=lambda kv: int(kv[0])):
        tok.add_special_tokens({"additional_special_tokens": [AddedToken(content, special=True)]})
        assert tok.convert_tokens_to_ids(content) == int(tid)
    return tok


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chatml_renders_as_transformers(tmp_path, base_dir, conv, add_generation_prompt):
    d = _write(_clone(base_dir, tmp_path), CHATML_TEMPLATE)
    ct = load_chat_template(d)
    msgs = CONVERSATIONS[conv]
    expected = _hf_render(CHATML_TEMPLATE, msgs, add_generation_prompt,
                          bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert ct.render(msgs, add_generation_prompt=add_generation_prompt) == expected
    # dicts render the same as Message objects
    dicts = [{"role": m.role, "content": m.content} for m in msgs]
    assert ct.render(dicts, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("conv", [0, 1])
def test_mixtral_template_renders_as_transformers(tmp_path, base_dir, conv):
    d = _write(_clone(base_dir, tmp_path), MIXTRAL_TEMPLATE)
    ct = load_chat_template(d)
    msgs = CONVERSATIONS[conv]
    expected = _hf_render(MIXTRAL_TEMPLATE, msgs, True, bos_token="<s>", eos_token="</s>")
    assert ct.render(msgs) == expected
    assert expected.startswith("<s>[INST] ")


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("conv", [1, 2])
def test_chatml_ids_equal_transformers(tmp_path, base_dir, conv, legacy):
    added = {k: {"content": v, "special": True, "lstrip": False, "rstrip": False,
                 "normalized": False, "single_word": False} for k, v in CHATML_ADDED.items()}
    d = _write(_clone(base_dir, tmp_path), CHATML_TEMPLATE, added_tokens_decoder=added,
               legacy=legacy)
    # The fixture's 512-piece model has no room for the two ChatML tokens: they are added ids
    # past the sentencepiece vocabulary, as in a real checkpoint with added tokens. Our
    # Tokenizer's vocabulary check would refuse them, so this compares the text pieces only.
    hf = _hf_tokenizer(d, legacy, CHATML_ADDED, CHATML_TEMPLATE)
    msgs = [{"role": m.role, "content": m.content} for m in CONVERSATIONS[conv]]
    expected = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                      return_dict=False)
    ct = load_chat_template(d)
    tok = Tokenizer.from_dir(d)
    got = _encode_allowing_added(ct, tok, ct.render(CONVERSATIONS[conv]))
    assert got == list(expected)


def _encode_allowing_added(ct: ChatTemplate, tok: Tokenizer, text: str) -> list[int]:
    # Pretend the vocabulary covers the added ids (the model's embedding table would).
    class Wide:
        def __init__(self, inner):
            self._sp, self._control, self.vocab_size = inner._sp, inner._control, 10**6
    return ct.encode_text(Wide(tok), text)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("conv", [0, 1])  # Mixtral's template refuses conversation 2's system role
def test_mixtral_ids_equal_transformers(tmp_path, base_dir, conv, legacy):
    d = _write(_clone(base_dir, tmp_path), MIXTRAL_TEMPLATE, legacy=legacy)
    hf = _hf_tokenizer(d, legacy, {}, MIXTRAL_TEMPLATE)
    msgs = [{"role": m.role, "content": m.content} for m in CONVERSATIONS[conv]]
    expected = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                      return_dict=False)
    tok = Tokenizer.from_dir(d)
    got = load_chat_template(d).encode(tok, CONVERSATIONS[conv])
    assert got == list(expected)
    assert tok.decode(got) == hf.decode(expected, skip_special_tokens=True).strip() or \
        tok.decode(got).strip() == hf.decode(expected, skip_special_tokens=True).strip()
    if legacy and conv == 0:
        # A first user turn is what Tokenizer.encode_chat builds. Later turns differ: the
        # template puts an assistant reply in the same text piece as "[/INST]" (no "▁" before
        # it), encode_chat encodes the reply on its own ("▁4.").
        assert got == tok.encode_chat(CONVERSATIONS[conv])


def test_raise_exception_is_tokenizer_error(tmp_path, base_dir):
    d = _write(_clone(base_dir, tmp_path), MIXTRAL_TEMPLATE)
    ct = load_chat_template(d)
    with pytest.raises(TokenizerError, match="Only user and assistant roles are supported") as e:
        ct.render([Message("user", "a"), Message("tool", "b")])
    assert "tokenizer_config.json" in str(e.value)
    with pytest.raises(TokenizerError, match="must alternate"):
        ct.render(CONVERSATIONS[2])  # a leading system message
    with pytest.raises(TokenizerError, match="must alternate"):
        ct.encode(Tokenizer.from_dir(d), [Message("assistant", "hi")])


def test_template_sources(tmp_path, base_dir):
    # no template -> None
    assert load_chat_template(_clone(base_dir, tmp_path / "none")) is None
    # a list of named templates: "default" is used
    d = _write(_clone(base_dir, tmp_path / "list"),
               [{"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "X{{ eos_token }}"}])
    assert load_chat_template(d).render([Message("user", "a")]) == "X</s>"
    d = _write(_clone(base_dir, tmp_path / "nodefault"), [{"name": "tool_use", "template": "T"}])
    with pytest.raises(TokenizerError, match="no \"default\""):
        load_chat_template(d)
    # chat_template.jinja wins over tokenizer_config.json
    d = _write(_clone(base_dir, tmp_path / "jinja"), "CONFIG")
    (d / "chat_template.jinja").write_text("FILE {{ messages[0].content }}")
    assert load_chat_template(d).render([Message("user", "a")]) == "FILE a"
    # a template that does not compile names its file
    d = _write(_clone(base_dir, tmp_path / "bad"), "{% for %}")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat template does not compile"):
        load_chat_template(d)


def test_environment_matches_transformers(tmp_path, base_dir):
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}"
        "{% endif %}{% set ns.n = ns.n + 1 %}{{ m | tojson }}\n{% endfor %}{{ ns.n }}"
        "{{ strftime_now('%Y') | length }}{{ dict(a=1) | tojson }}"
    )
    d = _write(_clone(base_dir, tmp_path), template)
    msgs = [Message("user", "<b>&é</b>"), Message("assistant", "x"), Message("user", "y")]
    assert load_chat_template(d).render(msgs) == _hf_render(template, msgs, True)
    # the sandbox refuses what transformers' refuses
    d = _write(_clone(base_dir, tmp_path / "evil"), "{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError):
        load_chat_template(d).render(msgs)
