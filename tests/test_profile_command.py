"""`offload profile` as llama.cpp users expect: it times a synthetic true-shape pack by default
(written to a temporary folder, removed after), reports each candidate's spread and says which
are within the noise, writes no VRAM figure without a GPU, writes a RAM budget the CPU engine
keeps, writes where --profile NAME finds it, and --list lists the shipped and the user's."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import cli.profile
from cli.bench import bench_command
from cli.profile import _choose, _noise_note, profile_command
from offload.bench import BenchConfig, Measure
from offload.demo import DEMO_MODEL_DIR
from offload.engine import Engine
from offload.errors import SettingError
from offload.profile import (
    engine_kwargs,
    list_profiles,
    load_profile,
    save_profile,
    shipped_profiles,
    user_profiles_dir,
)

from tests.test_synth import TINY  # noqa: E402  (Mixtral's proportions, timed in a second on two cores)


def app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("profile")(profile_command)
    app.command("bench")(bench_command)
    return app


@pytest.fixture
def user_dir(tmp_path, monkeypatch) -> Path:
    """A user profiles folder of this test's own ($XDG_CONFIG_HOME under tmp_path)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    folder = user_profiles_dir()
    assert folder == tmp_path / "config" / "offload" / "profiles"
    return folder


def test_the_user_dir_follows_xdg_and_defaults_to_dot_config(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert user_profiles_dir() == tmp_path / "offload" / "profiles"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")  # the XDG spec: absolute paths only
    assert user_profiles_dir() == Path.home() / ".config" / "offload" / "profiles"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert user_profiles_dir() == Path.home() / ".config" / "offload" / "profiles"


def test_by_default_it_times_a_synthetic_pack_and_writes_a_profile_found_by_name(user_dir, monkeypatch, tmp_path):
    written: list[Path] = []
    real = cli.profile.synthesize

    def spy(config, out, **kwargs):
        written.append(Path(out))
        assert config["vocab_size"] == 4096 and kwargs["layers"] == 2
        assert (kwargs["expert_bits"], kwargs["attn_bits"]) == (4, 4)  # the cpu-only base profile's bits
        return real(config, out, **kwargs)

    monkeypatch.setattr(cli.profile, "synthesize", spy)
    monkeypatch.setattr(cli.profile, "synthetic_config", lambda preset: dict(TINY))
    monkeypatch.chdir(tmp_path)  # nothing is written relative to the working folder
    result = CliRunner().invoke(app(), ["profile", "--device", "cpu", "-p", "4", "-n", "4", "-r", "2"])
    assert result.exit_code == 0, result.output
    assert "writing a synthetic mixtral-8x7b, 2 of 4 layers" in result.stderr
    # every candidate: mean ± std (min..max) over the repetitions
    lines = [line for line in result.stderr.splitlines() if "experts/layer" in line]
    assert len(lines) == 6 and all(" ± " in line and ".." in line and "over 2 rep(s)" in line for line in lines)
    assert "within the noise" in result.stdout or "beyond the noise" in result.stdout
    assert "use it with --profile this-machine" in result.stdout
    # the pack went to a temporary folder, and is gone
    assert written and not written[0].exists() and not written[0].parent.exists()
    assert not (tmp_path / "profiles").exists()
    out = user_dir / "this-machine.toml"
    assert out.is_file()
    profile = load_profile("this-machine")  # by name, from the user's folder
    assert Path(profile.source) == out
    assert "synthetic mixtral-8x7b pack of 2 layers" in profile.comment
    # no GPU here: no VRAM figure, and the plan's budget is RAM, with nothing held beside it
    assert profile.gpu == "none" and profile.vram == "0" and profile.vram_bytes == 0
    assert profile.plan_vram_bytes is not None and 0 < profile.plan_vram_bytes <= profile.ram_bytes
    assert profile.plan_ram == "0"
    assert "VRAM" not in result.stdout.split(";")[0] and "no GPU" in result.stdout

    # --profile this-machine from another folder finds it, and bench names it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    bench = CliRunner().invoke(
        app(), ["bench", str(DEMO_MODEL_DIR), "--profile", "this-machine", "-p", "4", "-n", "2", "-r", "1", "-o", "csv"]
    )
    assert bench.exit_code == 0, bench.output
    assert ",this-machine," in bench.stdout


def test_a_cpu_profile_budget_bounds_the_ram_the_engine_takes(tmp_path):
    """The plan `offload profile` writes without a GPU (vram = a RAM budget, ram = 0): the CPU
    engine's slots stay inside the budget and nothing more is staged in RAM."""
    base = load_profile("cpu-only")
    from dataclasses import replace

    profile = replace(base, plan_vram="14MiB", plan_ram="0", context=2048, expert_bits=16, attn_bits=16)
    path = save_profile(profile, tmp_path / "small.toml")
    kwargs = engine_kwargs(load_profile(path))
    assert kwargs["device"] == "cpu" and kwargs["vram"] == "14MiB" and kwargs["ram"] == "0"
    engine = Engine.load(DEMO_MODEL_DIR, **kwargs)
    try:
        plan = engine.plan
        assert plan is not None and plan.host_experts == 0
        assert plan.slots_per_layer < engine.config.num_local_experts  # the budget binds on this model
        assert plan.device_bytes <= 14 * 2**20
    finally:
        engine.close()
    # what the old plan did: the same vram with no ram stages every expert in RAM besides
    engine = Engine.load(DEMO_MODEL_DIR, **dict(kwargs, ram=None))
    try:
        assert engine.plan.host_experts == engine.config.num_hidden_layers * engine.config.num_local_experts
    finally:
        engine.close()


def test_profile_on_a_given_model_writes_to_out_and_says_the_path(user_dir, tmp_path):
    out = tmp_path / "mine.toml"
    result = CliRunner().invoke(
        app(), ["profile", str(DEMO_MODEL_DIR), "--out", str(out), "--device", "cpu", "-p", "4", "-n", "2", "-r", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "one repetition per candidate" in result.stdout  # no spread, no claim
    assert f"--profile {out}" in result.stdout
    assert load_profile(out).vram == "0"
    with pytest.raises(SettingError, match="user profile"):
        load_profile("mine")  # not in a searched folder


def test_list_shows_shipped_and_user_profiles_and_where_they_live(user_dir):
    save_profile(load_profile("cpu-only"), user_dir / "my-box.toml")
    save_profile(load_profile("rtx-3060-12gb"), user_dir / "cpu-only.toml")  # shadowed by the shipped one
    (user_dir / "broken.toml").write_text("[machine]\n")
    result = CliRunner().invoke(app(), ["profile", "--list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    by_name: dict[str, list[str]] = {}
    for line in lines[1:]:
        by_name.setdefault(line.split()[0], []).append(line)
    for name in shipped_profiles():
        line = by_name[name][0]
        assert " shipped " in line
    assert "NVIDIA GeForce RTX 3060  12GiB  32GiB" in by_name["rtx-3060-12gb"][0]
    assert " user " in by_name["my-box"][0] and "No GPU, 32 GiB RAM" in by_name["my-box"][0]
    assert "shadowed by shipped" in by_name["cpu-only"][1]
    assert "invalid:" in by_name["broken"][0]
    assert f"user: {user_dir}" in result.stdout and "shipped: " in result.stdout
    # lookup by name: shipped first, then the user's
    assert load_profile("cpu-only").gpu == "none"
    assert Path(load_profile("my-box").source) == user_dir / "my-box.toml"
    names = [(e.name, e.where) for e in list_profiles()]
    assert names.index(("cpu-only", "shipped")) < names.index(("cpu-only", "user"))


def measure(*values: float) -> Measure:
    return Measure(tuple(values))


def test_within_noise_and_the_choice_it_makes():
    assert measure(10, 11, 12).within_noise(measure(11.5, 12.5, 13))  # ranges overlap
    assert not measure(10, 10.2, 10.1).within_noise(measure(12, 12.1, 12.2))
    assert measure(10.0).within_noise(measure(10.0)) and not measure(10.0).within_noise(measure(10.5))

    def candidate(policy, count, *tg):
        from offload.bench import BenchResult

        config = BenchConfig(experts_per_layer=count, policy=policy)
        return (config, BenchResult("m", "cpu", config, 4, 4, len(tg), None, measure(*tg), None), 1)

    lru = candidate("lru", 8, 50, 52, 54)
    combined = candidate("combined", 8, 49, 51, 53)
    slow = candidate("combined", 2, 30, 31, 32)
    # the base policy is within the noise of the fastest: the base policy is kept, and said
    chosen = _choose([lru, combined, slow], "combined")
    assert chosen is combined
    note = _noise_note([lru, combined, slow], chosen, "combined", 3)
    assert "within the noise" in note and "kept policy combined" in note and "2 experts/layer" not in note
    # clearly faster: it wins, and nothing is within its noise
    fast = candidate("lru", 4, 80, 81, 82)
    chosen = _choose([fast, combined, slow], "combined")
    assert chosen is fast and "beyond the noise" in _noise_note([fast, combined, slow], chosen, "combined", 3)


def test_a_noisy_base_candidate_does_not_win_by_its_own_wide_range():
    from offload.bench import BenchResult

    def candidate(policy, *tg):
        config = BenchConfig(experts_per_layer=8, policy=policy)
        return (config, BenchResult("m", "cpu", config, 4, 4, len(tg), None, measure(*tg), None), 1)

    lru, noisy = candidate("lru", 50, 52, 54), candidate("combined", 10, 40, 55)
    assert noisy[1].tg.within_noise(lru[1].tg)  # the ranges overlap ...
    chosen = _choose([lru, noisy], "combined")
    assert chosen is lru  # ... but its mean is outside the fastest's range
    note = _noise_note([lru, noisy], chosen, "combined", 3)
    assert "noisy" in note and "policy combined" in note.split("noisy")[1]
