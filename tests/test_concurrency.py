"""Several processes on one pack: each reads its own experts from the same files and gets the
tokens a single run gets (the pack is only read; nothing is shared between the processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offload.demo import DEMO_MODEL_DIR
from offload.engine import Engine, GenerationSettings

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "To open a file for reading, use"


@pytest.fixture(scope="module")
def demo_pack(tmp_path_factory):
    from offload.pack import convert

    return convert(DEMO_MODEL_DIR, tmp_path_factory.mktemp("shared") / "pack")


def test_three_processes_on_one_pack_give_the_tokens_of_one(demo_pack):
    command = [
        sys.executable, "-m", "cli", "generate", str(demo_pack), "-p", PROMPT, "-n", "24", "--experts-per-layer",
        "2", "--ram", "0", "--device", "cpu", "--temp", "0.8", "--seed", "3", "--ignore-eos", "--json",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    tokens = [json.loads(out)["tokens"] for out, _ in outs]
    engine = Engine.load(demo_pack, device="cpu", experts_per_layer=2, ram=0)
    ids = engine.tokenizer.encode(PROMPT, bos=True)
    from offload.sampling import SamplingSettings

    settings = GenerationSettings(
        max_new_tokens=24, ignore_eos=True, sampling=SamplingSettings(temperature=0.8, seed=3)
    )
    want = engine.generate(ids, settings).run().tokens
    assert tokens == [want, want, want]
    assert all(json.loads(out)["cache"]["disk_loads"] > 0 for out, _ in outs)  # each read the pack
