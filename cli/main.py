"""The ``offload`` command line: argument parsing and rich output only, no engine logic.

Every ``OffloadError`` (a user's mistake: bad path, damaged checkpoint, bad setting) becomes
one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from offload.engine import DEFAULT_DTYPE, DTYPES, Engine, GenerationSettings
from offload.errors import OffloadError
from offload.sampling import SamplingSettings
from offload.tokenizer import Message

app = typer.Typer(
    name="offload",
    help="Run Mixture-of-Experts models (Mixtral) on a GPU smaller than the model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True, highlight=False)

USER_ERROR_EXIT = 2


@app.callback()
def main() -> None:
    """Run Mixture-of-Experts models (Mixtral) on a GPU smaller than the model."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn engine errors into one clear line and exit code 2."""
    try:
        yield
    except OffloadError as exc:
        stderr.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(USER_ERROR_EXIT) from None


def load_engine(model: Path, device: str, dtype: str, context: Optional[int]) -> Engine:
    """Load with a progress bar on stderr when it is a terminal."""
    if not stderr.is_terminal:
        return Engine.load(model, device=device, dtype=dtype, context_length=context)
    with Progress(
        TextColumn("loading {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    ) as bar:
        task = bar.add_task(model.name, total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{model.name}: {what}")

        return Engine.load(model, device=device, dtype=dtype, context_length=context, progress=progress)


@app.command()
def generate(
    model: Path = typer.Argument(..., help="A Hugging Face Mixtral checkpoint directory (safetensors)."),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="Text to complete. Read from stdin when omitted and stdin is not a terminal."
    ),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=0, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely tokens; 0 is off."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass; 1 is off."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalty for tokens already seen; 1 is off."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed, for repeatable sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's instruct chat format."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (with --chat)."),
    dtype: str = typer.Option(
        DEFAULT_DTYPE, "--dtype", help=f"Compute dtype: {'|'.join(DTYPES)} (default {DEFAULT_DTYPE})."
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present, else CPU), cpu or cuda[:N]."),
    context: Optional[int] = typer.Option(
        None, "--context", help="Context length to allocate (default: min(model maximum, 4096))."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with ids, text and statistics."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence."),
) -> None:
    """Complete a prompt: BOS + the prompt's tokens (no chat template unless --chat)."""
    with user_errors():
        if prompt is None:
            if sys.stdin.isatty():
                raise OffloadError("no prompt: give -p TEXT or pipe text on stdin")
            prompt = sys.stdin.read()
        sampling = SamplingSettings(
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repeat_penalty, seed=seed
        )
        settings = GenerationSettings(
            max_new_tokens=max_tokens, stop=tuple(stop), sampling=sampling, ignore_eos=ignore_eos
        )
        engine = load_engine(model, device, dtype, context)
        tokenizer = engine.tokenizer
        if chat:
            messages = ([Message("system", system)] if system else []) + [Message("user", prompt)]
            prompt_ids = tokenizer.encode_chat(messages)
        else:
            prompt_ids = tokenizer.encode(prompt, bos=True)
        generation = engine.generate(prompt_ids, settings)

        if as_json:
            generation.run()
            print(json.dumps({
                "model": str(model),
                "prompt_tokens": prompt_ids,
                "tokens": generation.tokens,
                "text": generation.text,
                "stop_reason": generation.stats.stop_reason,
                "stats": generation.stats.to_dict(),
            }))
            return
        try:
            for event in generation:
                if event.text:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            generation.stats.stop_reason = "interrupted"
        sys.stdout.write("\n")
        sys.stdout.flush()
        s = generation.stats
        stderr.print(
            f"prompt {s.prompt_tokens} tok, {s.prompt_tokens_per_s:.1f} t/s | "
            f"generation {s.generated_tokens} tok, {s.generation_tokens_per_s:.1f} t/s | "
            f"stop: {s.stop_reason}",
            style="dim",
        )


if __name__ == "__main__":
    app()
