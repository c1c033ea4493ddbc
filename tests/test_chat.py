"""`offload chat`: the pipe mode through typer's runner, the session's history and commands,
and the interactive mode driven in a real terminal (tmux)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli.chat import ChatSession, chat_command, command, read_message
from cli.main import app as main_app
from offload.engine import Engine
from offload.sampling import SamplingSettings
from offload.tokenizer import Message
from tests.model_builder import WINDOWED

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

chat_app = typer.Typer(pretty_exceptions_enable=False)
chat_app.command("chat")(chat_command)


@chat_app.command("noop")
def _noop() -> None:  # a second command keeps "chat" a subcommand, as in the real app
    pass


def test_pipe_mode_prints_the_reply_that_generate_chat_gives(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    common = ["-n", "8", "--temp", "0.7", "--top-p", "0.9", "--seed", "5", "--dtype", "float32", "--system", "Be brief."]
    chat = runner.invoke(chat_app, ["chat", d, *common], input="hello there")
    assert chat.exit_code == 0, chat.output
    reference = runner.invoke(main_app, ["generate", d, *common, "--chat", "--json"], input="hello there")
    assert reference.exit_code == 0, reference.output
    text = json.loads(reference.stdout)["text"]
    assert chat.stdout == text + "\n"


def test_pipe_mode_errors_are_one_line_and_exit_2(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    empty = runner.invoke(chat_app, ["chat", d], input="  \n")
    assert empty.exit_code == 2 and "no message" in empty.output
    bad = runner.invoke(chat_app, ["chat", "/no/such/model"], input="hi")
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1


def test_history_is_rendered_each_turn_and_commands_change_the_session(model_dirs):
    engine = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32")
    session = ChatSession(engine, SamplingSettings(temperature=0.0), 3, system="sys")
    out: list[str] = []
    first = session.reply("one", out.append)
    assert session.history == [Message("user", "one"), Message("assistant", first.text)]
    assert "".join(out) == first.text
    second = session.reply("two", out.append)
    expected = engine.tokenizer.encode_messages(
        [Message("system", "sys"), Message("user", "one"), Message("assistant", first.text), Message("user", "two")]
    )
    assert second.prompt_ids == expected
    stopped = session.reply("three", lambda _: None, stop_requested=lambda: True)  # Ctrl+C after the first token
    assert stopped.stats.stop_reason == "interrupted" and len(stopped.tokens) == 1
    assert session.history[-1] == Message("assistant", stopped.text)

    assert not command(session, "/set temp 0.5") and session.sampling.temperature == 0.5
    assert not command(session, "/set top_p 2") and session.sampling.top_p == 1.0  # bad value: kept
    assert not command(session, "/set max_tokens -1") and session.max_tokens == 3
    assert not command(session, "/set max_tokens 9") and session.max_tokens == 9
    assert not command(session, "/system new") and session.system == "new"
    assert not command(session, "/clear") and session.history == []
    assert command(session, "/bye")


def test_multi_line_input_between_fences():
    lines = iter(['"""', "first", "second", '"""'])
    assert read_message(lambda _: next(lines)) == "first\nsecond"
    lines = iter(['"""start', 'end"""'])
    assert read_message(lambda _: next(lines)) == "start\nend"
    assert read_message(lambda _: '"""one"""') == "one"
    assert read_message(lambda _: "plain") == "plain"


# ---- the real terminal ------------------------------------------------------------------------

PROMPT_LINE = re.compile(r"^>>>( |$)", re.M)


def _command_line() -> str:
    """`python -m cli chat` once cli.main registers it; until then an app with only chat."""
    if any(c.name == "chat" for c in main_app.registered_commands):
        return f"{sys.executable} -m cli chat"
    code = (
        "import typer; from cli.chat import chat_command; app = typer.Typer(); "
        "app.command('chat')(chat_command); app.command('noop')(lambda: None); app(prog_name='offload')"
    )
    return f"{sys.executable} -c \"{code}\" chat"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_interactive_chat_in_a_terminal(tmp_path):
    socket = f"offload-chat-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", socket]
    status = tmp_path / "status"
    cmd = (
        f"cd {ROOT} && {_command_line()} --seed 1 --temp 0 --max-tokens 6 --device cpu --experts-per-layer 4; "
        f"echo exited $? > {status}; sleep 60"
    )
    subprocess.run([*tmux, "new-session", "-d", "-s", "chat", "-x", "220", "-y", "200", cmd], check=True)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-S", "-", "-t", "chat"],
                              capture_output=True, text=True).stdout

    def wait_for(check, what: str, timeout: float = 20.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = screen()
            if check(text):
                return text
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{screen()}")

    def prompts(text: str) -> int:
        return len(PROMPT_LINE.findall(text))

    def send(*keys: str) -> None:
        subprocess.run([*tmux, "send-keys", "-t", "chat", *keys], check=True)

    try:
        wait_for(lambda s: prompts(s) == 1, "the first prompt")
        send("hello there", "Enter")
        text = wait_for(lambda s: prompts(s) == 2, "the first reply")
        assert "hit rate" in text and "t/s" in text  # the stats line after the reply

        send("tell me more", "Enter")
        text = wait_for(lambda s: prompts(s) == 3, "the second reply")
        assert text.count("t/s") >= 4

        send("/set temp 0.5", "Enter")
        wait_for(lambda s: "temp = 0.5" in s and prompts(s) == 4, "/set temp")

        send("/set max_tokens 2000", "Enter")
        wait_for(lambda s: "max_tokens = 2000" in s and prompts(s) == 5, "/set max_tokens")
        send("and then?", "Enter")
        send("C-c")
        text = wait_for(lambda s: prompts(s) == 6, "the prompt back after Ctrl+C")
        assert "interrupted" in text
        assert not status.exists()  # Ctrl+C kept the session

        send("/stats", "Enter")
        text = wait_for(lambda s: prompts(s) == 7, "/stats")
        assert re.search(r"layer +0: hit rate \d\.\d{3}", text) and re.search(r"all +: hit rate", text)

        send("/bye", "Enter")
        wait_for(lambda s: status.exists(), "the process to end")
        assert status.read_text().strip() == "exited 0"
        assert "bye" in screen()
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_pipe_mode_names_the_automatic_profile(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    chat = runner.invoke(chat_app, ["chat", d, "-n", "2", "--dtype", "float32"], input="hello there")
    assert chat.exit_code == 0, chat.output
    notes = [line for line in chat.stderr.splitlines() if line.startswith("profile: ")]
    assert len(notes) == 1 and "(auto: " in notes[0] and "profile" not in chat.stdout


def test_each_reply_writes_its_own_router_trace(model_dirs, tmp_path):
    """--trace FILE: reply n's trace is FILE-n, holding that reply's prompt (the conversation so
    far) and its decode steps, with the cache's outcomes."""
    from offload.trace import load_trace

    engine = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32", experts_per_layer=3, ram=0)
    session = ChatSession(engine, SamplingSettings(temperature=0.0), 4, system=None, trace=tmp_path / "chat.jsonl")
    replies = [session.reply(text, lambda _: None) for text in ("one", "two")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat-1.jsonl", "chat-2.jsonl"]
    for n, reply in enumerate(replies, 1):
        steps = load_trace(tmp_path / f"chat-{n}.jsonl").sequences[0].steps
        assert [s.phase for s in steps].count("prefill") == len(reply.prompt_ids)
        assert [s.phase for s in steps].count("decode") == len(reply.tokens) - 1
        assert all(s.outcome for s in steps if s.phase == "decode")
    piped = runner.invoke(
        chat_app, ["chat", str(model_dirs[WINDOWED.name]), "-n", "3", "--experts-per-layer", "3",
                   "--trace", str(tmp_path / "piped.jsonl")], input="hello",
    )
    assert piped.exit_code == 0, piped.output
    assert load_trace(tmp_path / "piped-1.jsonl").header.policy == "combined"
