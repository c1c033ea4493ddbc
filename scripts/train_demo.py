"""Train the bundled demo model: a small Mixtral trained on the Python documentation.

What it does, end to end and seeded (same machine and thread count, same bytes out):
1. gets the reStructuredText sources of the Python 3.11 documentation from Debian's
   ``python3.11-doc`` package (``apt-get download``, or ``--docs-deb FILE``), PSF licence;
2. splits them by file into training and held-out validation text;
3. trains a sentencepiece BPE tokenizer on the training text;
4. trains transformers' ``MixtralForCausalLM`` (8 experts, top-2, router auxiliary loss on)
   for a fixed number of steps;
5. saves it in the Hugging Face layout, in bf16, with the tokenizer, a model card and the
   validation text.

What it is not: part of the engine (it needs the dev extra's transformers, which the engine
never imports). Run it from the repository root:

    python scripts/train_demo.py --out offload/demo/model --valid-out benchmarks/data/python-docs-valid.txt
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from offload.tokenizer import TRAINER_OPTIONS

DOCS_PACKAGE = "python3.11-doc"
SOURCES_DIR = "usr/share/doc/python3.11/html/_sources"
EXCLUDED = ("whatsnew/changelog.rst.txt",)  # issue numbers and names, little language
VALID_EVERY = 20  # about 1 file in 20 is held out, chosen by a hash of its path

MODEL = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=160,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    sliding_window=None,
    tie_word_embeddings=True,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
    bos_token_id=1,
    eos_token_id=2,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data ------------------------------------------------------------------------------------


def fetch_docs(work: Path, deb: Path | None) -> Path:
    """Extract the documentation package; returns the _sources directory."""
    target = work / "docs"
    sources = target / SOURCES_DIR
    if sources.is_dir():
        return sources
    if deb is None:
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", DOCS_PACKAGE], cwd=work, check=True)
        deb = next(work.glob(f"{DOCS_PACKAGE}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return sources


def split_documents(sources: Path) -> tuple[list[str], list[str], list[str]]:
    """(training texts, validation texts, validation file names), sorted by path."""
    train, valid, valid_names = [], [], []
    for path in sorted(sources.rglob("*.rst.txt")):
        rel = path.relative_to(sources).as_posix()
        if rel in EXCLUDED:
            continue
        text = path.read_text(encoding="utf-8")
        if zlib.crc32(rel.encode()) % VALID_EVERY == 0:
            valid.append(text)
            valid_names.append(rel)
        else:
            train.append(text)
    return train, valid, valid_names


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> spm.SentencePieceProcessor:
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=vocab_size,
        character_coverage=0.9995,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=False,
        **TRAINER_OPTIONS,
    )
    out.write_bytes(buffer.getvalue())
    return spm.SentencePieceProcessor(model_proto=buffer.getvalue())


def encode_documents(sp: spm.SentencePieceProcessor, texts: list[str]) -> np.ndarray:
    """All documents as one id stream: <s> doc </s> <s> doc </s> ..."""
    ids: list[int] = []
    for text in texts:
        ids.append(sp.bos_id())
        ids.extend(sp.encode(text))
        ids.append(sp.eos_id())
    return np.asarray(ids, dtype=np.int16)


# ---- training --------------------------------------------------------------------------------


def batches(stream: torch.Tensor, seq_len: int, batch: int, generator: torch.Generator):
    """Endless random windows [batch, seq_len + 1] from the training stream (seq_len predictions each)."""
    high = stream.numel() - seq_len - 1
    while True:
        starts = torch.randint(0, high, (batch,), generator=generator)
        yield torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, max_windows: int) -> float:
    """Mean next-token cross-entropy over consecutive windows of the validation stream."""
    model.eval()
    total, count = 0.0, 0
    for w in range(min(max_windows, (stream.numel() - 1) // seq_len)):
        chunk = stream[w * seq_len : w * seq_len + seq_len + 1].long()[None]
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += seq_len
    model.train()
    return total / count


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--valid-out", type=Path, help="where to write the held-out validation text")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "offload-demo-work")
    parser.add_argument("--docs-deb", type=Path, help=f"a downloaded {DOCS_PACKAGE} .deb")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=500)
    args = parser.parse_args()

    from transformers import MixtralConfig, MixtralForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)

    sources = fetch_docs(args.work, args.docs_deb)
    train_texts, valid_texts, valid_names = split_documents(sources)
    log(f"documents: {len(train_texts)} training, {len(valid_texts)} validation "
        f"({sum(map(len, train_texts)) / 1e6:.1f} / {sum(map(len, valid_texts)) / 1e6:.2f} M chars)")

    tokenizer_path = args.work / "tokenizer.model"
    sp = train_tokenizer(train_texts, MODEL["vocab_size"], tokenizer_path)
    train_stream = torch.from_numpy(encode_documents(sp, train_texts))
    valid_stream = torch.from_numpy(encode_documents(sp, valid_texts))
    log(f"tokens: {train_stream.numel():,} training, {valid_stream.numel():,} validation")

    config = MixtralConfig(**MODEL)
    model = MixtralForCausalLM(config)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params / 1e6:.2f}M parameters ({params * 2 / 2**20:.1f} MiB in bf16)")

    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    data = batches(train_stream, args.seq_len, args.batch, torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        chunk = next(data)
        # transformers shifts the labels itself, and adds router_aux_loss_coef * aux_loss to the loss
        out = model(input_ids=chunk, labels=chunk, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            rate = (step + 1) * args.batch * args.seq_len / elapsed
            eta = (args.steps - step - 1) * elapsed / (step + 1)
            log(f"step {step + 1}/{args.steps} loss {out.loss.item():.3f} "
                f"aux {out.aux_loss.item():.3f} {rate:,.0f} tok/s, eta {eta / 60:.1f} min")
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            loss = evaluate(model, valid_stream, args.seq_len, max_windows=40)
            log(f"validation loss {loss:.3f}, perplexity {math.exp(loss):.1f}")

    out_dir = args.out
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(staging, max_shard_size="12MB")
    shutil.copy(tokenizer_path, staging / "tokenizer.model")
    (staging / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": MODEL["max_position_embeddings"],
        "tokenizer_class": "LlamaTokenizer",
    }, indent=2) + "\n")
    (staging / "training.json").write_text(json.dumps({
        "source": f"Debian package {DOCS_PACKAGE}, {SOURCES_DIR} (PSF License)",
        "validation_files": valid_names,
        "excluded_files": list(EXCLUDED),
        "training_tokens": int(train_stream.numel()),
        "validation_tokens": int(valid_stream.numel()),
        "parameters": params,
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)
    if args.valid_out:
        args.valid_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.valid_out.with_suffix(".partial")
        tmp.write_text("".join(valid_texts), encoding="utf-8")
        os.replace(tmp, args.valid_out)
    log(f"saved {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
