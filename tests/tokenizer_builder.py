"""Build a tiny Mixtral-style sentencepiece tokenizer for tests.

``write_tokenizer`` trains a small BPE model in memory, deterministically, on text every
machine with Python has (the source of a few stdlib modules) plus a fixed list of non-ASCII
sentences, and writes ``tokenizer.model`` and a minimal ``tokenizer_config.json`` the way a
Hugging Face Mixtral repository has them. Ids follow Mixtral: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2.

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
