"""Every command, every kind of bad input: one clear line on stderr naming the culprit, exit 2.

Kinds: a model (or trace) path that does not exist, a profile that does not exist or cannot be
read, and a budget nothing fits in. Commands: generate, chat, bench, info, convert, profile,
simulate, stats (each where the kind applies)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.main import app
from offload.demo import DEMO_MODEL_DIR

runner = CliRunner()
DEMO = str(DEMO_MODEL_DIR)
MISSING = "/no/such/model"  # starts with "/": never taken for a hub id, so no network

CASES = [
    # (id, args, stdin, what the line must name)
    ("generate-model", ["generate", MISSING, "-p", "x"], None, MISSING),
    ("chat-model", ["chat", MISSING], "hi\n", MISSING),
    ("bench-model", ["bench", MISSING, "-p", "4", "-n", "2"], None, MISSING),
    ("info-model", ["info", MISSING], None, MISSING),
    ("convert-model", ["convert", MISSING, "{tmp}/pack"], None, MISSING),
    ("profile-model", ["profile", MISSING, "--out", "{tmp}/p.toml"], None, MISSING),
    ("simulate-trace", ["simulate", "/no/such/trace.jsonl"], None, "/no/such/trace.jsonl"),
    ("stats-trace", ["stats", "/no/such/trace.jsonl"], None, "/no/such/trace.jsonl"),
    ("generate-profile", ["generate", DEMO, "-p", "x", "--profile", "no-such-card"], None, "no-such-card"),
    ("chat-profile", ["chat", DEMO, "--profile", "no-such-card"], "hi\n", "no-such-card"),
    ("bench-profile", ["bench", DEMO, "-p", "4", "-n", "2", "--profile", "no-such-card"], None, "no-such-card"),
    ("info-profile", ["info", DEMO, "--profile", "no-such-card"], None, "no-such-card"),
    ("profile-from", ["profile", DEMO, "--from", "no-such-card", "--out", "{tmp}/p.toml"], None, "no-such-card"),
    ("generate-broken-profile", ["generate", DEMO, "-p", "x", "--profile", "{tmp}/broken.toml"], None, "broken.toml"),
    ("generate-budget", ["generate", DEMO, "-p", "x", "--vram", "1MiB"], None, "minimum"),
    ("chat-budget", ["chat", DEMO, "--vram", "1MiB"], "hi\n", "minimum"),
    ("bench-budget", ["bench", DEMO, "-p", "4", "-n", "2", "--vram", "1MiB"], None, "minimum"),
    ("info-budget", ["info", DEMO, "--vram", "1MiB"], None, "minimum"),
    ("profile-budget", ["profile", DEMO, "--device", "cpu", "--headroom", "99.999%", "-p", "2", "-n", "1",
                        "--out", "{tmp}/p.toml"], None, "no candidate plan fits"),
]


@pytest.mark.parametrize("args, stdin, culprit", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(args, stdin, culprit, tmp_path):
    (tmp_path / "broken.toml").write_text("[machine]\ngpu = 3\n", encoding="utf-8")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, args, input=stdin)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and culprit in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "p.toml").exists() and not (tmp_path / "pack").exists()  # nothing half-written
