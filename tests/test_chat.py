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

from cli.chat import HISTORY_LINES, SETTINGS, ChatSession, InputHistory, chat_command, command, history_path, read_message
from cli.main import app as main_app
from cli.report import stats_line
from tests.test_prefix_reuse import lcp
from offload.demo import DEMO_MODEL_DIR
from offload.engine import Engine, GenerationSettings, GenerationStats
from offload.errors import SettingError
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
    asks = iter([False] + [True] * 99)  # asked once before the prompt's one chunk, then after each token
    stopped = session.reply("three", lambda _: None, stop_requested=lambda: next(asks))  # Ctrl+C after a token
    assert stopped.stats.stop_reason == "interrupted" and len(stopped.tokens) == 1
    assert session.history[-1] == Message("assistant", stopped.text)
    turns = list(session.history)
    unsaid = session.reply("four", lambda _: None, stop_requested=lambda: True)  # Ctrl+C in the prompt
    assert unsaid.stats.stop_reason == "interrupted" and unsaid.tokens == [] and session.history == turns

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


def test_pipe_mode_takes_every_sampling_flag_that_generate_takes(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    flags = ["-n", "12", "--temp", "0.9", "--top-k", "20", "--top-p", "0.95", "--min-p", "0.05",
             "--repeat-penalty", "1.3", "--seed", "3", "--dtype", "float32"]
    reference = runner.invoke(main_app, ["generate", d, *flags, "--chat", "--json"], input="hello there")
    assert reference.exit_code == 0, reference.output
    text = json.loads(reference.stdout)["text"]
    chat = runner.invoke(chat_app, ["chat", d, *flags], input="hello there")
    assert chat.exit_code == 0, chat.output
    assert chat.stdout == text + "\n"
    stop = text.strip()[2:4]  # a stop string from inside the reply: chat must end before it
    assert len(stop) == 2
    cut = runner.invoke(chat_app, ["chat", d, *flags, "--stop", "zzzz", "--stop", stop], input="hello there")
    assert cut.exit_code == 0 and cut.stdout == text[: text.index(stop)] + "\n"




def test_each_turn_prefills_only_what_follows_the_held_conversation(model_dirs):
    """Turn n's prompt (the whole conversation) shares with what the engine holds (turn n-1's
    prompt and reply, less the last token) everything before the new turn: only the rest is
    prefilled, and the reply is a fresh engine's full prefill's (greedy)."""
    path = model_dirs[WINDOWED.name]
    engine = Engine.load(path, device="cpu", dtype="float32", experts_per_layer=3)
    oracle = Engine.load(path, device="cpu", dtype="float32", experts_per_layer=3)
    session = ChatSession(engine, SamplingSettings(temperature=0.0), 5, system="sys")
    held: list[int] = []
    previous: list[int] = []
    reply = ""
    for n, text in enumerate(("one", "two", "three and four")):
        gen = session.reply(text, lambda _: None)
        ids = gen.prompt_ids
        reused = min(lcp(held, ids), len(ids) - 1)
        assert (gen.stats.reused_tokens, gen.stats.prompt_tokens) == (reused, len(ids) - reused)
        if n:
            assert reused >= len(previous)  # the previous prompt is a prefix of this one (Mixtral's format)
            user = len(engine.tokenizer.encode("[INST] " + text + " [/INST]", bos=False))
            said = len(engine.tokenizer.encode(reply, bos=False))  # the reply as the format renders it
            assert user <= gen.stats.prompt_tokens <= said + 1 + user  # at most: the reply, eos, the user turn
        assert gen.tokens == oracle.generate(ids, GenerationSettings(max_new_tokens=5)).run().tokens
        previous, held, reply = ids, ids + gen.tokens[:-1], gen.text


def test_a_full_context_drops_the_oldest_turns_and_keeps_the_system_message(model_dirs):
    engine = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32", context_length=96)
    notes: list[str] = []
    session = ChatSession(engine, SamplingSettings(temperature=0.0), 8, system="be brief", notify=notes.append)
    prompts = []
    for i in range(8):
        prompts.append(session.reply(f"message number {i} with a few more words", lambda _: None).prompt_ids)
    assert all(len(ids) <= 96 - 8 for ids in prompts)
    assert notes and all(n.startswith("context full (96 tokens): dropped the oldest ") for n in notes)
    assert "the system message stays" in notes[0]
    first_user = next(m.content for m in session.history if m.role == "user")
    assert first_user != "message number 0 with a few more words"
    assert engine.tokenizer.decode(prompts[-1]).lstrip().startswith("[INST] be brief")
    turns, noted = list(session.history), len(notes)
    roomy = "a message that needs room " * 3
    assert session.fit(roomy)[1] > 0  # it would drop turns
    stopped = session.reply(roomy, lambda _: None, stop_requested=lambda: True)
    assert stopped.tokens == [] and session.history == turns and len(notes) == noted  # Ctrl+C: nothing dropped
    with pytest.raises(SettingError, match=r"shorten it \(/clear") as refused:
        session.reply("word " * 200, lambda _: None)
    assert "\n" not in str(refused.value) and session.history == turns  # nothing dropped for it
    assert session.reply("short again", lambda _: None).tokens  # and the chat goes on


GOOD = {  # /set NAME VALUE -> (where it lands, the value)
    "temp 0.5": ("temperature", 0.5),
    "top_p 0.8": ("top_p", 0.8),
    "top_k 40": ("top_k", 40),
    "min_p 0.05": ("min_p", 0.05),
    "seed 7": ("seed", 7),
    "repeat_penalty 1.1": ("repetition_penalty", 1.1),
}
BAD = [("temp", "abc"), ("temp", "-1"), ("top_p", "0"), ("top_p", "nan"), ("top_k", "1.5"), ("min_p", "2"),
       ("seed", "x"), ("seed", str(2**64)), ("repeat_penalty", "0"), ("max_tokens", "-1"), ("max_tokens", "many")]


def test_set_takes_every_setting_and_show_prints_them(model_dirs, capsys):
    engine = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32")
    session = ChatSession(engine, SamplingSettings(), 3, None)
    for line, (field, value) in GOOD.items():
        assert not command(session, f"/set {line}")
        assert getattr(session.sampling, field) == value, line
    command(session, "/set max_tokens 9")
    command(session, r"/set stop \n\nEND")
    command(session, "/set system be brief, please")
    settings = session.settings()
    assert (settings.max_new_tokens, settings.stop, session.system) == (9, ("\n\nEND",), "be brief, please")
    assert settings.sampling == SamplingSettings(temperature=0.5, top_p=0.8, top_k=40, min_p=0.05, seed=7,
                                                 repetition_penalty=1.1)  # turn 0: seed + 0
    capsys.readouterr()
    for show in ("/show", "/set"):
        command(session, show)
        shown = capsys.readouterr().err
        for want in ("temp = 0.5", "top_p = 0.8", "top_k = 40", "min_p = 0.05", "seed = 7", "repeat_penalty = 1.1",
                     "max_tokens = 9", r'stop = "\n\nEND"', 'system = "be brief, please"'):
            assert want in shown, (show, want, shown)
        assert len(shown.strip().splitlines()) == len(SETTINGS)
    command(session, "/set stop none")
    command(session, "/set seed none")
    command(session, "/set system none")
    assert (session.stop, session.sampling.seed, session.system) == ((), None, None)


@pytest.mark.parametrize("name, value", BAD)
def test_a_bad_set_value_is_one_line_naming_the_setting(model_dirs, capsys, name, value):
    engine = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32")
    session = ChatSession(engine, SamplingSettings(temperature=0.7, seed=1), 3, None)
    before = (session.sampling, session.max_tokens)
    assert not command(session, f"/set {name} {value}")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: /set {name}: {name} takes ")
    assert f"got {value!r}" in err
    for python in ("could not convert", "invalid literal", "Traceback", "must be"):
        assert python not in err
    assert (session.sampling, session.max_tokens) == before


def test_unknown_and_missing_set_values_are_one_line(model_dirs, capsys):
    engine = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32")
    session = ChatSession(engine, SamplingSettings(), 3, None)
    command(session, "/set warmth 3")
    command(session, "/set temp")
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: /set warmth: unknown setting 'warmth': choose one of temp, top_p")
    assert err[1] == "error: /set temp: give a value (/set NAME VALUE; /show lists the settings)"


def test_input_history_is_written_and_read_back(tmp_path, monkeypatch):
    readline = pytest.importorskip("readline")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    path = tmp_path / "offload" / "chat_history"
    assert history_path() == path
    warnings: list[str] = []
    try:
        readline.clear_history()
        history = InputHistory.open(warnings.append)
        for line in ("first line", "second line"):
            readline.add_history(line)
        history.save()
        assert path.is_file() and "second line" in path.read_text()
        readline.clear_history()
        InputHistory.open(warnings.append)  # a new session
        items = [readline.get_history_item(i) for i in range(1, readline.get_current_history_length() + 1)]
        assert items == ["first line", "second line"]
        for i in range(HISTORY_LINES + 50):
            readline.add_history(f"line {i}")
        history.save()
        lines = [line for line in path.read_text().splitlines() if line.startswith("line ")]
        assert len(lines) == HISTORY_LINES and lines[-1] == f"line {HISTORY_LINES + 49}"
        assert warnings == []
    finally:
        readline.clear_history()


def test_the_default_history_path_and_a_relative_xdg_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert history_path() == tmp_path / ".local" / "share" / "offload" / "chat_history"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # the XDG spec: ignored
    assert history_path() == tmp_path / ".local" / "share" / "offload" / "chat_history"


def test_a_history_that_cannot_be_written_is_one_warning(tmp_path, monkeypatch):
    readline = pytest.importorskip("readline")
    (tmp_path / "offload").write_text("a file where the directory would be")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    warnings: list[str] = []
    try:
        history = InputHistory.open(warnings.append)
        readline.add_history("hello")
        history.save()
        history.save()
    finally:
        readline.clear_history()
    assert len(warnings) == 1 and warnings[0].startswith("input history: cannot write ")
    assert "going on without it" in warnings[0]


def test_the_stats_line_names_every_figure():
    stats = GenerationStats(prompt_tokens=24, reused_tokens=312, generated_tokens=64, decode_steps=63,
                            prefill_seconds=0.5, decode_seconds=0.7, first_token_seconds=0.512, stop_reason="length")
    line = stats_line(stats, None, load_seconds=1.5, context_length=4096, peak=("peak RSS", 512 * 2**20))
    assert line == ("load 1.50 s | first token 0.512 s | prompt 24 tok (312 reused) 48.0 t/s | "
                    "generation 64 tok 90.0 t/s | ctx 400/4096 | experts resident | peak RSS 512 MiB | stop: length")
    plain = stats_line(GenerationStats(prompt_tokens=5, generated_tokens=0, stop_reason="eos"))
    assert plain == "prompt 5 tok 0.0 t/s | generation 0 tok 0.0 t/s | experts resident"


def test_the_stats_line_reports_the_expert_cache(model_dirs):
    engine = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32", experts_per_layer=2, ram=0)
    gen = engine.generate([1, 5, 6, 7], GenerationSettings(max_new_tokens=4, ignore_eos=True)).run()
    total = gen.cache_stats.total()
    line = stats_line(gen.stats, gen.cache_stats, context_length=engine.context_length)
    assert f"hit rate {total.hit_rate:.3f}, {total.bytes_moved / 4 / 2**20:.2f} MiB/tok" in line
    assert f"ctx 8/{engine.context_length}" in line and "reused" not in line
    in_ram = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32", experts_per_layer=2)
    gen = in_ram.generate([1, 5, 6, 7], GenerationSettings(max_new_tokens=4, ignore_eos=True)).run()
    total = gen.cache_stats.total()
    assert total.cpu_runs > 0  # a CPU computes a RAM-tier miss where it lies: the line says so
    share = f"{total.cpu_runs / total.requests:.0%}"
    assert f"hit rate {total.hit_rate:.3f} ({share} of uses run on the CPU in place)" in stats_line(gen.stats, gen.cache_stats)


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


STATS = re.compile(r"prompt (\d+) tok(?: \((\d+) reused\))? [\d.]+ t/s \| generation (\d+) tok [\d.]+ t/s \| "
                   r"ctx (\d+)/(\d+)")
SPINNER = set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")  # rich's "dots" frames, shown while the prompt is processed


def stats_lines(text: str) -> list[tuple[int, int, int, int, int]]:
    """(prefilled, reused, generated, ctx used, ctx length) of each stats line on the screen."""
    return [(int(a), int(b or 0), int(c), int(d), int(e)) for a, b, c, d, e in STATS.findall(text)]


class Terminal:
    """`offload chat ARGS` in a tmux session of its own: keys in, the screen out."""

    def __init__(self, tmp_path: Path, args: str, env: str = ""):
        self.tmux = ["tmux", "-L", f"offload-chat-{uuid.uuid4().hex[:8]}"]
        self.status = tmp_path / "status"
        cmd = f"cd {ROOT} && {env} {_command_line()} {args}; echo exited $? > {self.status}; sleep 60"
        subprocess.run([*self.tmux, "new-session", "-d", "-s", "chat", "-x", "220", "-y", "200", cmd], check=True)

    def screen(self) -> str:
        return subprocess.run([*self.tmux, "capture-pane", "-p", "-S", "-", "-t", "chat"],
                              capture_output=True, text=True).stdout

    def wait_for(self, check, what: str, timeout: float = 60.0, poll: float = 0.1) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.screen()
            if check(text):
                return text
            time.sleep(poll)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()}")

    def prompts(self, text: str) -> int:
        return len(PROMPT_LINE.findall(text))

    def send(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "chat", *keys], check=True)

    def type_line(self, text: str, marker: str) -> None:
        """Type ``text`` (ending in ``marker``) and wait until it is all on the screen, without Enter."""
        self.send("-l", text)
        self.wait_for(lambda s: marker in s, f"the typed line ending {marker}", timeout=60)

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


def _user_turn_tokens(text: str) -> int:
    from offload.tokenizer import Tokenizer

    return len(Tokenizer.from_dir(DEMO_MODEL_DIR).encode("[INST] " + text + " [/INST]", bos=False))


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_interactive_chat_in_a_terminal(tmp_path):
    term = Terminal(tmp_path, "--seed 1 --temp 0 --max-tokens 6 --device cpu --experts-per-layer 4",
                    env=f"XDG_DATA_HOME={tmp_path}")
    prompts, send, wait_for, status = term.prompts, term.send, term.wait_for, term.status
    try:
        wait_for(lambda s: prompts(s) == 1, "the first prompt")
        send("hello there", "Enter")
        text = wait_for(lambda s: prompts(s) == 2, "the first reply")
        assert "hit rate" in text and "t/s" in text and re.search(r"\bload \d+\.\d\d s \|", text)  # the stats line

        send("tell me more", "Enter")
        text = wait_for(lambda s: prompts(s) == 3, "the second reply")
        assert text.count("t/s") >= 4
        send("and one more thing", "Enter")
        text = wait_for(lambda s: prompts(s) == 4, "the third reply")
        lines = stats_lines(text)
        assert len(lines) == 3 and len(re.findall(r"\bload \d+\.\d\d s \|", text)) == 1  # the first reply's line only
        assert lines[0][1] == 0  # nothing held before the first turn
        for (done, reused, made, used, length), message in zip(lines, ("hello there", "tell me more",
                                                                       "and one more thing")):
            assert used == done + reused + made and length == 2048
        for before, now, message in zip(lines, lines[1:], ("tell me more", "and one more thing")):
            assert now[1] >= before[0] + before[1]  # every earlier prompt token was reused
            user = _user_turn_tokens(message)  # only the new turn prefilled: its tokens, eos, the reply's
            assert user <= now[0] <= user + 1 + 2 * before[2], (before, now)

        send("/set temp 0.5", "Enter")
        wait_for(lambda s: "temp = 0.5" in s and prompts(s) == 5, "/set temp")

        send("/set max_tokens 2000", "Enter")
        wait_for(lambda s: "max_tokens = 2000" in s and prompts(s) == 6, "/set max_tokens")
        send("and then?", "Enter")
        wait_for(lambda s: s[s.rindex("and then?") + 9:].strip(), "the reply to stream")  # Ctrl+C in the reply
        send("C-c")
        text = wait_for(lambda s: prompts(s) == 7, "the prompt back after Ctrl+C")
        assert "interrupted" in text
        assert not status.exists()  # Ctrl+C kept the session

        send("/set temp abc", "Enter")
        text = wait_for(lambda s: prompts(s) == 8, "/set temp abc")
        assert "error: /set temp: temp takes a number >= 0 (0 is greedy); got 'abc'" in text
        send("/show", "Enter")
        text = wait_for(lambda s: prompts(s) == 9, "/show")
        assert "top_k = 0" in text and "repeat_penalty = 1" in text and "stop = none" in text

        send("/stats", "Enter")
        text = wait_for(lambda s: prompts(s) == 10, "/stats")
        assert re.search(r"layer +0: hit rate \d\.\d{3}", text) and re.search(r"all +: hit rate", text)

        send("/bye", "Enter")
        wait_for(lambda s: status.exists(), "the process to end")
        assert status.read_text().strip() == "exited 0"
        assert "bye" in term.screen()
    finally:
        term.close()
    history = (tmp_path / "offload" / "chat_history").read_text()
    assert "hello there" in history and "/set temp 0.5" in history


def _words(tokens: int, tag: str) -> str:
    """A message of about ``tokens`` tokens in the demo tokenizer, starting and ending with
    ``tag`` (messages with different tags share no prefix to reuse)."""
    from offload.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(DEMO_MODEL_DIR)
    text = f"{tag} "
    while len(tokenizer.encode(text, bos=False)) < tokens:
        text += "the quick brown fox jumps over the lazy dog and then it runs far away. "
    return text + tag


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_long_conversation_drops_old_turns_and_ctrl_c_stops_a_long_prefill(tmp_path):
    """Context 2048: three messages of ~800 tokens overflow it (the oldest turn goes, one dim
    line says so, the chat goes on); Ctrl+C while a ~1900-token message is processed stops the
    prefill and returns to the prompt; the next message is answered."""
    term = Terminal(tmp_path, "--temp 0 --max-tokens 4 --device cpu --context 2048", env="OMP_NUM_THREADS=1")
    prompts, send, wait_for = term.prompts, term.send, term.wait_for
    try:
        wait_for(lambda s: prompts(s) == 1, "the first prompt", timeout=30)
        for n, tag in enumerate(("ENDA", "ENDB", "ENDC"), start=2):
            term.type_line(_words(800, tag), tag)
            send("Enter")
            text = wait_for(lambda s: prompts(s) == n, f"reply {n - 1}", timeout=60)
        assert "context full (2048 tokens): dropped the oldest 1 turn; the system message stays" in text
        lines = stats_lines(text)
        assert len(lines) == 3 and all(used <= 2048 for _, _, _, used, _ in lines)
        assert lines[1][1] >= lines[0][0]  # turn 2 reused turn 1's prompt

        stopped = None
        for attempt, tag in enumerate(("ENDD", "ENDE", "ENDF")):  # Ctrl+C must land in the prefill (~1 s)
            before = len(stats_lines(term.screen()))
            term.type_line(_words(1900, tag), tag)
            send("Enter")
            try:
                wait_for(lambda s: SPINNER & set(s[s.rindex(tag):]), "the spinner", timeout=5, poll=0.02)
            except AssertionError:
                pass  # not seen: Ctrl+C anyway
            send("C-c")
            text = wait_for(lambda s: prompts(s) == 5 + attempt, "the prompt back after Ctrl+C", timeout=60)
            stopped = re.search(r"\(interrupted while processing the prompt, after (\d+) tokens; "
                                r"the message was not added\)", text)
            if stopped:
                assert len(stats_lines(text)) == before  # no reply, no stats line
                break
        assert stopped, f"Ctrl+C never landed in the prompt processing; the screen:\n{text}"
        assert int(stopped.group(1)) < 1900
        assert not term.status.exists()

        send("hello again", "Enter")
        text = wait_for(lambda s: prompts(s) == 6 + attempt, "the reply after the interrupted one", timeout=60)
        assert len(stats_lines(text)) == 4 + attempt
        send("/bye", "Enter")
        wait_for(lambda s: term.status.exists(), "the process to end")
        assert term.status.read_text().strip() == "exited 0"
    finally:
        term.close()


def test_pipe_mode_names_the_automatic_profile(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    chat = runner.invoke(chat_app, ["chat", d, "-n", "2", "--dtype", "float32"], input="hello there")
    assert chat.exit_code == 0, chat.output
    notes = [line for line in chat.stderr.splitlines() if line.startswith("profile: ")]
    assert len(notes) == 1 and "(auto" in notes[0] and "profile" not in chat.stdout  # (auto: or (auto;


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


def test_verbose_prints_the_expert_cache_report_after_each_reply(model_dirs, capsys):
    from cli.chat import interactive

    engine = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32", experts_per_layer=2)
    lines = iter(["hello there", "and again"])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    for verbose, want in ((False, 0), (True, 2)):
        lines = iter(["hello there", "and again"])
        session = ChatSession(engine, SamplingSettings(), 3, None)
        interactive(session, read=read, verbose=verbose)
        err = capsys.readouterr().err
        assert len(re.findall(r"^all +: hit rate", err, re.M)) == want, err  # the report's total, once a reply
