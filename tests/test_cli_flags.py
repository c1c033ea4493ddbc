"""The command line as llama.cpp's and ollama's users expect it: llama.cpp's flags as aliases,
escapes in -p and --stop, flags parsed and shown as flags, llama.cpp flags offload does not take
refused in one line, -q, --profile none, -t, -f, --min-p, --version, -h, the demo model's
introduction and the short automatic-profile line."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli.common
from cli.common import ProfileChoice, process_escapes, set_threads, short_reason
from cli.main import app
from offload.demo import DEMO_MODEL_DIR
from offload.errors import OffloadError
from tests.model_builder import WINDOWED

runner = CliRunner()
DEMO = str(DEMO_MODEL_DIR)
PROMPT = "def parse_args(argv):"
DOCS_PROMPT = "To open a file for reading, use"  # the demo model answers with a blank line in 6 tokens


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch):
    """The demo model's marker file goes to a fresh data dir, never the user's."""
    home = tmp_path / "data"
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    return home


@pytest.fixture
def threads():
    """Put torch's thread count back after a test that sets it."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def one_error_line(result, *names: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "╭" not in result.output
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def generate_json(*args: str) -> dict:
    result = run("generate", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ---- escapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("typed, meant", [
    (r"a\nb", "a\nb"),
    (r"\n\n", "\n\n"),
    (r"tab\there", "tab\there"),
    (r"cr\r", "cr\r"),
    (r"back\\slash", "back\\slash"),
    (r"\"quoted\" and \'single\'", "\"quoted\" and 'single'"),
    (r"\x41\x62", "Ab"),
    (r"caf\xc3\xa9", "café"),
    (r"\\n", "\\n"),  # an escaped backslash, then a plain n
    (r"\q stays", "\\q stays"),  # unknown escapes stay as typed
    (r"\x4", "\\x4"),  # too short for \xNN
    (r"\xZZ", "\\xZZ"),
    ("ends with \\", "ends with \\"),
    ("no escapes, é", "no escapes, é"),
])
def test_escapes_are_llama_cpps(typed, meant):
    assert process_escapes(typed, "-p/--prompt") == meant


def test_escapes_that_make_no_utf8_are_one_error():
    with pytest.raises(OffloadError, match=r"--stop: .*not UTF-8 \(byte 0xff\)"):
        process_escapes(r"\xff", "--stop")


def test_stop_with_an_escaped_blank_line_stops_at_the_blank_line():
    """The README's `--stop "\\n\\n"` (a backslash and an n, as the shell passes it)."""
    common = ["-m", DEMO, "-p", DOCS_PROMPT, "-n", "24", "--temp", "0", "-q"]
    raw = generate_json(*common, "--stop", r"\n\n", "--no-escape")
    assert "\n\n" in raw["text"] and raw["stop_reason"] == "length"  # the model does write a blank line
    stopped = generate_json(*common, "--stop", r"\n\n")
    assert stopped["stop_reason"] == "stop"
    assert stopped["text"] == raw["text"][:raw["text"].index("\n\n")]
    streamed = run("generate", *common, "--stop", r"\n\n")
    assert streamed.exit_code == 0 and streamed.stdout == stopped["text"] + "\n"


def test_prompt_escapes_and_no_escape(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    escaped = generate_json(d, "-p", r"one\ttwo", "-n", "1")
    typed = generate_json(d, "-p", "one\ttwo", "-n", "1")
    literal = generate_json(d, "-p", r"one\ttwo", "-n", "1", "--no-escape")
    assert escaped["prompt_tokens"] == typed["prompt_tokens"] != literal["prompt_tokens"]
    assert generate_json(d, "-p", r"one\ttwo", "-n", "1", "-e")["prompt_tokens"] == escaped["prompt_tokens"]


# ---- llama.cpp's names ----------------------------------------------------------------------------


def test_model_option_is_the_model_argument(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    positional = generate_json(d, "-p", PROMPT, "-n", "3", "--dtype", "float32")
    for args in (["-m", d], ["--model", d], [f"--model={d}"], ["-hf", d]):
        out = generate_json(*args, "-p", PROMPT, "-n", "3", "--dtype", "float32")
        assert out["model"] == d and out["tokens"] == positional["tokens"], args
    after = generate_json("-p", PROMPT, "-n", "3", "--dtype", "float32", "-m", d)  # anywhere on the line
    assert after["tokens"] == positional["tokens"]


def test_the_model_given_twice_or_without_a_value_is_one_line(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    one_error_line(run("generate", d, "-m", d, "-p", "x"), "the model is given twice")
    one_error_line(run("generate", "-m", d, "--model", d, "-p", "x"), "the model is given twice")
    one_error_line(run("generate", "-p", "x", "-m"), "-m needs a value")
    one_error_line(run("generate", "-m", "-p", "x"), "-m needs a value")


@pytest.mark.parametrize("args", [
    ["chat", "-m", "/no/such/model"],
    ["bench", "-m", "/no/such/model", "-p", "4", "-n", "2"],
    ["info", "-m", "/no/such/model"],
    ["convert", "-m", "/no/such/model", "{tmp}/pack"],
    ["profile", "-m", "/no/such/model", "--out", "{tmp}/p.toml"],
], ids=lambda a: a[0])
def test_every_model_command_takes_m(args, tmp_path):
    """-m reaches each command's MODEL argument: the error names the path given to -m."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    one_error_line(run(*args, input="hi\n"), "/no/such/model")
    assert not (tmp_path / "pack").exists() and not (tmp_path / "p.toml").exists()


def test_chat_and_info_run_with_m(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    chat = run("chat", "-m", d, "-n", "2", "--dtype", "float32", input="hello")
    assert chat.exit_code == 0 and chat.stdout.strip(), chat.output
    info = run("info", "--model", d)
    assert info.exit_code == 0 and info.stdout == run("info", d).stdout


def test_ctx_size_sets_the_context(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    for flag in ("-c", "--context", "--ctx-size"):
        out = generate_json(d, "-p", PROMPT, "-n", "100", "--ignore-eos", flag, "16")
        assert out["stop_reason"] == "context", flag
        assert len(out["prompt_tokens"]) + len(out["tokens"]) == 16, flag
    roomy = generate_json(d, "-p", PROMPT, "-n", "20", "--ignore-eos", "-c", "64")
    assert roomy["stop_reason"] == "length" and len(roomy["tokens"]) == 20


def test_seed_s_and_min_p(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    common = ["-p", PROMPT, "-n", "12", "--ignore-eos", "--dtype", "float32", "--temp", "3"]
    assert generate_json(d, *common, "-s", "5")["tokens"] == generate_json(d, *common, "--seed", "5")["tokens"]
    greedy = generate_json(d, "-p", PROMPT, "-n", "12", "--ignore-eos", "--dtype", "float32")["tokens"]
    hot = {tuple(generate_json(d, *common, "-s", str(s))["tokens"]) for s in range(3)}
    assert hot != {tuple(greedy)}  # at temperature 3 the draws differ from greedy ...
    for s in range(3):  # ... and min-p 1 keeps only the most likely token: greedy at any temperature
        assert generate_json(d, *common, "-s", str(s), "--min-p", "1")["tokens"] == greedy
    one_error_line(run("generate", d, "-p", "x", "--min-p", "1.5"), "--min-p")


def test_threads_set_torchs_threads(model_dirs, threads):
    d = str(model_dirs[WINDOWED.name])
    torch.set_num_threads(2)
    for flag in ("-t", "--threads"):
        torch.set_num_threads(2)
        result = run("generate", d, "-p", "x", "-n", "1", flag, "1")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1, flag
    logical, _ = cli.common.usable_cpus()
    many = run("generate", d, "-p", "x", "-n", "1", "-t", str(logical + 7))
    assert many.exit_code == 0 and torch.get_num_threads() == logical
    assert f"threads: {logical} (-t {logical + 7} is more than the {logical} CPUs here)" in many.stderr
    one_error_line(run("generate", d, "-p", "x", "-t", "0"), "--threads")


def test_a_profiles_threads_are_a_ceiling(model_dirs, tmp_path, threads):
    from offload.profile import load_profile

    d = str(model_dirs[WINDOWED.name])
    text = (Path(__file__).resolve().parents[1] / "profiles" / "cpu-only.toml").read_text()
    one = tmp_path / "one-thread.toml"
    one.write_text(text.replace("cpu_threads = 16", "cpu_threads = 1"))
    torch.set_num_threads(2)
    result = run("generate", d, "-p", "x", "-n", "1", "--profile", str(one))
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1  # the profile's 1 thread
    torch.set_num_threads(2)
    assert run("generate", d, "-p", "x", "-n", "1", "--profile", str(one), "-t", "2").exit_code == 0
    assert torch.get_num_threads() == 2  # -t wins
    torch.set_num_threads(1)
    cli.common.invocation.reset()  # no -t: as a command line without it
    assert set_threads(load_profile("cpu-only")) == 1 and torch.get_num_threads() == 1  # 16: never raised


def test_prompt_from_a_file(model_dirs, tmp_path):
    d = str(model_dirs[WINDOWED.name])
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"def f(x):\r\n    return x\\n\n")  # CRLF, a literal backslash-n, one final newline
    from_file = generate_json(d, "-f", str(path), "-n", "2")
    typed = generate_json(d, "-p", "def f(x):\n    return x\\n", "-n", "2", "--no-escape")
    assert from_file["prompt_tokens"] == typed["prompt_tokens"]
    assert generate_json(d, "--file", str(path), "-n", "2")["prompt_tokens"] == typed["prompt_tokens"]
    one_error_line(run("generate", d, "-f", str(path), "-p", "x"), "-p TEXT or -f FILE, not both")
    one_error_line(run("generate", d, "-f", str(tmp_path / "absent.txt")), "absent.txt: no such file")
    one_error_line(run("generate", d, "-f", str(tmp_path)), "a directory")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9".encode("latin-1"))
    one_error_line(run("generate", d, "-f", str(bad)), "latin1.txt: not valid UTF-8 (byte 0xe9 at byte 3)")


# ---- flags, unknown options, errors ---------------------------------------------------------------


def test_llama_cpp_flags_offload_does_not_take_are_one_line_never_a_model(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a flag was taken for a model")

    monkeypatch.setattr("offload.hub.resolve_model", no_model)
    line = one_error_line(run("generate", "-ngl", "4", "-p", "hi"), "unknown option -ngl", "--vram")
    assert "download" not in line and "huggingface" not in line
    one_error_line(run("generate", "--n-gpu-layers", "4", "-p", "hi"), "--n-gpu-layers", "--vram")
    one_error_line(run("chat", "-ngl", "99"), "-ngl")
    one_error_line(run("generate", "--cpu-moe", "-p", "hi"), "--cpu-experts all")
    one_error_line(run("generate", "-xyz", "-p", "hi"), "unknown option -xyz")
    one_error_line(run("generate", "-nfoo", "-p", "hi"), "unknown option -nfoo", "-n takes a number")
    one_error_line(run("generate", "--no-such-flag", "-p", "hi"), "--no-such-flag")
    one_error_line(run("generate", "-p", "hi", "-n", "many"), "--max-tokens")
    one_error_line(run("no-such-command"), "no-such-command", "lists the commands")


def test_an_attached_short_value_still_parses(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    assert len(generate_json(d, f"-p{PROMPT}", "-n3", "--ignore-eos")["tokens"]) == 3


@pytest.mark.parametrize("args, flag", [
    (["generate", "--chat", "true", "-p", "hi"], "--chat"),
    (["generate", "-p", "hi", "--json", "yes"], "--json"),
    (["generate", "-p", "hi", "--chat=1"], "--chat"),
    (["generate", "-p", "hi", "-q", "false"], "-q"),
    (["chat", "--force", "true"], "--force"),
])
def test_a_flag_given_a_value_is_one_line(args, flag, monkeypatch):
    monkeypatch.setattr("offload.hub.resolve_model", lambda *a, **k: pytest.fail("taken for a model"))
    one_error_line(run(*args, input="hi"), f"{flag} takes no value")


def help_of(*command: str) -> str:
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [
    (), ("generate",), ("chat",), ("bench",), ("info",), ("convert",), ("profile",), ("simulate",), ("stats",),
    ("synth",), ("trace", "convert"),
], ids=lambda c: " ".join(c) or "offload")
def test_h_is_help_and_flags_show_as_flags(command):
    text = help_of(*command)
    short = run(*command, "-h")
    assert short.exit_code == 0 and short.stdout == text
    assert "<bool>" not in text
    if command in (("generate",), ("chat",), ("bench",), ("info",), ("convert",), ("profile",)):
        assert "-m/--model" in text


def test_generate_help_names_the_new_options():
    text = help_of("generate")
    for name in ("--file", "-f", "--min-p", "--seed", "-s", "--context", "-c", "--threads", "-t", "--quiet", "-q",
                 "--no-escape"):
        assert re.search(rf"(^|[\s,]){re.escape(name)}([\s,]|$)", text, re.M), name
    words = " ".join(text.replace("│", " ").split())  # the help column's text, unwrapped
    assert words.count("(24GiB or 24G = 24 x 2^30 bytes, 24GB = 24 x 10^9; a bare number is refused)") == 2  # --vram, --ram
    assert "24GiB or 24G = 24 x 2^30 bytes, 24GB = 24 x 10^9; a bare number is refused); 0 reads" in words
    assert "Default: what fits in 80% of free RAM." in words and "Default: all" not in words


def test_version():
    result = run("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"offload {version('offload')} (torch {torch.__version__})\n"
    assert re.fullmatch(r"offload \d+\.\d+\.\d+\S* \(torch \S+\)\n", result.stdout)


# ---- quiet, profile none, the profile line, the demo model's introduction -----------------------


def test_quiet_and_profile_none(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    loud = run("generate", d, "-p", "x", "-n", "2")
    assert loud.exit_code == 0 and [line for line in loud.stderr.splitlines() if line.startswith("profile: ")]
    for flag in ("-q", "--quiet"):
        quiet = run("generate", d, "-p", "x", "-n", "2", flag)
        assert quiet.exit_code == 0 and "profile: " not in quiet.stderr, flag
        assert "generation" in quiet.stderr  # the statistics stay
    plain = run("generate", d, "-p", PROMPT, "-n", "4", "--profile", "none", "--json")
    assert plain.exit_code == 0 and "profile: " not in plain.stderr, plain.output
    out = json.loads(plain.stdout)
    assert out["profile"] == "none" and out["plan"] is None
    assert out["tokens"] == generate_json(d, "-p", PROMPT, "-n", "4")["tokens"]
    assert run("generate", d, "-p", "x", "-n", "1", "--profile", "None").exit_code == 0


def test_the_automatic_profile_line_is_one_short_line(model_dirs):
    result = run("generate", str(model_dirs[WINDOWED.name]), "-p", "x", "-n", "1")
    notes = [line for line in result.stderr.splitlines() if line.startswith("profile: ")]
    assert len(notes) == 1 and len(notes[0]) <= 80, notes
    assert re.fullmatch(r"profile: \S+ \(auto: 16-bit, all experts resident\)", notes[0]), notes[0]
    assert "error" not in notes[0] and "--profile" not in notes[0]


@pytest.mark.parametrize("reason, short", [
    ("auto: best shipped profile for this CPU; 16-bit weights, every expert resident, no budget",
     "auto: 16-bit, all experts resident"),
    ("auto: best shipped profile for this GPU (NVIDIA GeForce RTX 3060); 4-bit weights, 2-3/8 experts per layer "
     "on the device (2.72 on average), the rest in RAM", "auto: 4-bit, 2-3/8 experts/layer on GPU, rest in RAM"),
    ("auto: best shipped profile for this GPU (NVIDIA T4); 4-bit weights, 2/8 experts per layer on the device, "
     "100 in RAM, the rest read from disk", "auto: 4-bit, 2/8 experts/layer on GPU, 100 in RAM, rest on disk"),
    ("auto: --vram: mixtral needs at least 23.4 GiB on the device at 4-bit weights; the budget is 7 GiB; plain "
     "defaults", "auto: plain defaults, no shipped profile fits"),
])
def test_reasons_are_shortened(reason, short):
    assert short_reason(reason) == short
    from offload.profile import load_profile

    line = ProfileChoice(load_profile("rtx-3060-12gb"), "rtx-3060-12gb (auto)", reason).note
    assert len(line) <= 80 and line.startswith("profile: rtx-3060-12gb (auto: ")
    long = ProfileChoice(load_profile("rtx-3060-12gb"), "x", reason.replace("4-bit", "nf4-dq experts, 8-bit attention")
                         * 3).note
    assert len(long) <= 80


def test_the_demo_model_introduces_itself_once(data_home):
    def intro(result) -> list[str]:
        assert result.exit_code == 0, result.output
        return [line for line in result.stderr.splitlines() if "offload-demo:" in line]

    assert intro(run("generate", "-p", "x", "-n", "1", "-q")) == []  # -q: nothing said, nothing remembered
    assert not (data_home / "offload").exists()
    first = intro(run("generate", "-p", "x", "-n", "1"))
    assert len(first) == 1 and "Python docs" in first[0] and "-m mistralai/Mixtral-8x7B-Instruct-v0.1" in first[0]
    assert (data_home / "offload" / "demo-introduced").is_file()
    assert intro(run("generate", "-p", "x", "-n", "1")) == []  # once per user
    assert intro(run("generate", "-m", DEMO, "-p", "x", "-n", "1")) == []


def test_verbose_is_the_per_layer_table_on_generate():
    from cli.main import app

    runner = CliRunner()
    plain = runner.invoke(app, ["generate", "-p", "def f(x):", "-n", "4", "--experts-per-layer", "4", "-q"])
    more = runner.invoke(app, ["generate", "-p", "def f(x):", "-n", "4", "--experts-per-layer", "4", "-q", "-v"])
    assert plain.exit_code == 0 and more.exit_code == 0, (plain.output, more.output)
    assert "expert cache" not in plain.output and "expert cache" in more.output
    assert plain.stdout == more.stdout  # the same tokens: -v only adds the table on stderr


# ---- --kv-bits and -b/--batch-size reach Engine.load (issue 17) ---------------------------------------


class _Stop(OffloadError):
    pass


def _spy_load(monkeypatch, seen: list, run_it: bool = False):
    """Engine.load as the commands call it, its keyword arguments kept; stopped with an OffloadError
    (exit 2, nothing run) unless ``run_it``."""
    from offload.engine import Engine

    real = Engine.load

    def load(model_dir, **kwargs):
        seen.append(kwargs)
        if not run_it:
            raise _Stop("stopped after Engine.load was called")
        return real(model_dir, **kwargs)

    monkeypatch.setattr(cli.common.Engine, "load", load)


@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["chat"], ["serve", "--port", "0"]])
def test_kv_bits_and_batch_size_reach_engine_load(monkeypatch, command):
    seen: list = []
    _spy_load(monkeypatch, seen)
    one_error_line(run(*command, "-m", DEMO, "--kv-bits", "8", "-b", "64", "--profile", "none", input="hi"),
                   "stopped after Engine.load")
    assert seen[-1]["kv_bits"] == 8 and seen[-1]["batch_size"] == 64
    one_error_line(run(*command, "-m", DEMO, "--batch-size", "32", "--profile", "none", input="hi"), "stopped")
    assert seen[-1]["batch_size"] == 32 and "kv_bits" not in seen[-1]  # not given: the engine's default


def test_a_profiles_kv_bits_reach_engine_load_and_a_flag_wins(monkeypatch, tmp_path):
    text = (Path(__file__).resolve().parents[1] / "profiles" / "cpu-only.toml").read_text()
    path = tmp_path / "kv8.toml"
    path.write_text(text.replace("[plan]", "[plan]\nkv_bits = 8", 1))
    seen: list = []
    _spy_load(monkeypatch, seen)
    one_error_line(run("generate", "-m", DEMO, "-p", "hi", "--profile", str(path)), "stopped")
    assert seen[-1]["kv_bits"] == 8 and "batch_size" not in seen[-1]
    one_error_line(run("generate", "-m", DEMO, "-p", "hi", "--profile", str(path), "--kv-bits", "16"), "stopped")
    assert seen[-1]["kv_bits"] == 16


def test_generate_runs_with_an_8_bit_kv_cache_in_small_chunks(monkeypatch):
    seen: list = []
    engines: list = []
    from offload.engine import Engine

    real = Engine.load

    def load(model_dir, **kwargs):
        seen.append(kwargs)
        engines.append(real(model_dir, **kwargs))
        return engines[-1]

    monkeypatch.setattr(cli.common.Engine, "load", load)
    out = generate_json("-m", DEMO, "-p", DOCS_PROMPT, "-n", "4", "--kv-bits", "8", "-b", "3", "-q")
    assert len(out["tokens"]) == 4
    assert engines[-1].prefill_chunk == 3 and engines[-1].model.cache.bits == 8


@pytest.mark.parametrize("args, names", [
    (["--kv-bits", "4"], ("--kv-bits 4", "16, 8")),
    (["-b", "0"], ("--batch-size",)),
    (["--batch-size", "many"], ("--batch-size",)),
])
def test_bad_kv_bits_and_batch_sizes_are_one_line(monkeypatch, args, names):
    monkeypatch.setattr("offload.hub.resolve_model", lambda *a, **k: pytest.fail("a model was read"))
    one_error_line(run("generate", "-m", DEMO, "-p", "hi", *args), *names)


def test_llama_cpps_cache_type_flags_point_at_kv_bits():
    one_error_line(run("generate", "-p", "hi", "-ctk", "q8_0"), "-ctk", "--kv-bits 8")
    one_error_line(run("generate", "-p", "hi", "-ub", "64"), "-ub", "-b/--batch-size")
