"""Build tiny tokenizers for tests: Mixtral-style sentencepiece, and Qwen-style tokenizer.json.

``write_tokenizer`` trains a small BPE model in memory, deterministically, on text every
machine with Python has (the source of a few stdlib modules) plus a fixed list of non-ASCII
sentences, and writes ``tokenizer.model`` and a minimal ``tokenizer_config.json`` the way a
Hugging Face Mixtral repository has them. Ids follow Mixtral: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2.

``write_json_tokenizer`` trains a byte-level BPE ``tokenizer.json`` with Qwen2's structure
(NFC, Qwen's split regex, ChatML special tokens after the vocabulary, no bos) with the
``tokenizers`` library, beside its tokenizer_config.json and generation_config.json.

It knows nothing about models; test fixtures that build tiny checkpoints call it to get a
tokenizer with the same vocabulary size as their embedding table.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import json.decoder
import textwrap
from pathlib import Path

import sentencepiece as spm

from offload.tokenizer import TRAINER_OPTIONS

DOCS = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "python-docs-valid.txt"

# Non-ASCII text so that byte fallback pieces (<0xE6> ...) and multi-byte characters appear.
NON_ASCII_SENTENCES = [
    "Le garçon a mangé une crème brûlée à Noël, près de la forêt.",
    "Où est l'hôpital ? Ça dépend de l'été et de l'hiver.",
    "Größere Brücken überqueren die Flüsse; Straße, Mädchen, schön.",
    "Der Bär fährt über die Grenze nach Österreich.",
    "日本語のテキストです。東京は日本の首都です。",
    "私は猫が好きです。今日はいい天気ですね。",
    "Emoji: 🙂 🚀 🎉 👍🏽 ❤️ and symbols: € £ ¥ © ™ → ≠ ∞.",
    "Ελληνικά: καλημέρα κόσμε. Русский: привет, мир.",
    "Español: ¿Dónde está la estación? ¡Mañana será otro día!",
]

_SOURCES = (argparse, textwrap, json.decoder)


def _training_lines():
    for module in _SOURCES:
        yield from inspect.getsource(module).splitlines()
    for _ in range(3):
        yield from NON_ASCII_SENTENCES


def _train(model_writer, vocab_size: int, character_coverage: float) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(),
        model_writer=model_writer,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        **TRAINER_OPTIONS,
    )


def write_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """Train a ``vocab_size``-piece BPE model and write it into ``out_dir``.

    Returns the path of ``tokenizer.model``. Same inputs, same bytes: training runs on one
    thread over a fixed corpus. ``vocab_size`` must be at least ~340 (256 byte pieces, the
    control ids, and the characters the corpus needs).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Keep the common non-ASCII letters (é, ü, 日...) as pieces when the vocabulary has room;
    # a smaller one sends every non-ASCII character through byte pieces.
    for coverage in (0.9995, 0.995):
        model = io.BytesIO()
        try:
            _train(model, vocab_size, coverage)
            break
        except RuntimeError as e:
            if "required_chars" not in str(e) or coverage == 0.995:
                raise
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "LlamaTokenizer",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5-Instruct's template, without the tools branch.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

def write_json_tokenizer(d: Path, vocab_size: int = 1200) -> Path:
    """tokenizer.json (``vocab_size`` byte-level BPE tokens, then <|endoftext|>, <|im_start|>,
    <|im_end|>), tokenizer_config.json (no bos, eos <|im_end|>, the ChatML template) and
    generation_config.json (both eos ids, and a bos_token_id the tokenizer never adds) in ``d``."""
    from tokenizers import (
        AddedToken,
        Regex,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from tokenizers import Tokenizer as HF

    d.mkdir(parents=True, exist_ok=True)
    tok = HF(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    lines = DOCS.read_text(encoding="utf-8").splitlines()[:4000] + NON_ASCII_SENTENCES * 3
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(str(d / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in specials}
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_prefix_space": False,
        "errors": "replace",
        "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {str(i): {"content": s, "special": True, "normalized": False,
                                          "lstrip": False, "rstrip": False, "single_word": False}
                                 for s, i in ids.items()},
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # Qwen's configs name a bos_token_id its tokenizer never adds; generation ends at either eos.
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}))
    return d
