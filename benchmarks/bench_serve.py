"""Tokens/s through ``offload serve`` against ``Engine.generate`` directly, on the same model.

What it measures: in one run, the bundled demo model (or ``--model``) loaded in this process
and, separately, served by a ``python -m cli serve`` process on a free port of 127.0.0.1, both
with the same torch thread count (``--threads``) and context. For each, ``--reps`` requests (after
one untimed warm-up) of the same greedy chat prompt, ``--tokens`` new tokens each, the generated
tokens divided by the wall time of the whole request: for the server, from sending the request
to its last byte (non-streamed and streamed, with the official ``openai`` client); for the
engine, from ``generate`` to the last token. The ratio server / direct is the HTTP, JSON and
thread-hop overhead. Both decode the same tokens (checked). What it is not: a load test (one
request at a time) or a measure of the engine's speed on a real model.

    python -m benchmarks.bench_serve [--tokens 64] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write about the list type in Python."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()

    import httpx
    import openai
    import torch

    from offload.demo import DEMO_MODEL_DIR
    from offload.engine import Engine, GenerationSettings
    from offload.sampling import SamplingSettings
    from offload.tokenizer import Message

    model = Path(args.model) if args.model else DEMO_MODEL_DIR
    torch.set_num_threads(args.threads)
    engine = Engine.load(model, device="cpu", context_length=args.context)
    ids = engine.tokenizer.encode_messages([Message("user", PROMPT)])
    settings = GenerationSettings(max_new_tokens=args.tokens, sampling=SamplingSettings(temperature=0.0),
                                  ignore_eos=True)

    def direct() -> tuple[float, str, int]:
        start = time.perf_counter()
        generation = engine.generate(ids, settings).run()
        return time.perf_counter() - start, generation.text, len(generation.tokens)

    direct()
    runs = [direct() for _ in range(args.reps)]
    direct_tps = [n / t for t, _, n in runs]
    direct_text = runs[0][1]
    engine.close()

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cli", "serve", str(model), "--port", str(port), "--context", str(args.context),
           "-q", "-t", str(args.threads), "--name", "bench"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        # the server has no ignore_eos: a max_tokens the demo model reaches (checked below)
        def served(stream: bool) -> tuple[float, str, int]:
            start = time.perf_counter()
            request = dict(model="bench", messages=[{"role": "user", "content": PROMPT}], max_tokens=args.tokens,
                           temperature=0)
            if stream:
                text, tokens = "", 0
                for chunk in client.chat.completions.create(stream=True, **request):
                    if chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
            else:
                reply = client.chat.completions.create(**request)
                text, tokens = reply.choices[0].message.content, reply.usage.completion_tokens
            return time.perf_counter() - start, text, tokens

        results = {}
        for stream in (False, True):
            served(stream)
            runs = [served(stream) for _ in range(args.reps)]
            results[stream] = ([n / t for t, _, n in runs], runs[0][1], runs[0][2])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    def fmt(values):
        return f"{statistics.mean(values):8.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:5.1f} t/s"

    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
          f"{platform.system()} {platform.release()}, python {platform.python_version()}, torch {torch.__version__}, "
          f"{args.threads} thread(s)")
    print(f"model: {'offload-demo' if model == DEMO_MODEL_DIR else model.name}, context {args.context}, {args.tokens} tokens per request, {args.reps} reps (+1 warm-up)")
    print(f"direct Engine.generate      : {fmt(direct_tps)}")
    for stream, label in ((False, "server, non-streamed (HTTP)"), (True, "server, streamed (SSE)    ")):
        tps, text, tokens = results[stream]
        same = "same tokens" if (tokens == args.tokens and text == direct_text) else \
            f"DIFFERENT ({tokens} tokens; text equal: {text == direct_text})"
        print(f"{label} : {fmt(tps)}  ratio {statistics.mean(tps) / statistics.mean(direct_tps):.3f}  ({same})")
    print(f"server exit status on SIGTERM: {proc.returncode}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
