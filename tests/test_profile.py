"""Machine profiles: shipped files load, bad files are refused naming file and field, round trip,
the cpu-only plan loads the demo model, and `offload profile` writes a profile that reads back."""

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from offload.demo import DEMO_MODEL_DIR
from offload.engine import Engine
from offload.errors import SettingError
from offload.profile import (
    best_shipped_profile,
    does_it_fit,
    engine_kwargs,
    load_profile,
    probe_machine,
    save_profile,
    shipped_profiles,
)

SHIPPED = ("cpu-only", "rtx-3060-12gb", "rtx-4060-8gb", "rtx-4090-24gb", "t4-16gb")
GOOD = (Path(__file__).resolve().parents[1] / "profiles" / "rtx-3060-12gb.toml").read_text()


def test_every_shipped_profile_loads():
    assert set(SHIPPED) <= set(shipped_profiles())
    for name in SHIPPED:
        profile = load_profile(name)
        assert profile.name == name and profile.comment
        assert profile.plan_vram_bytes is None or profile.plan_vram_bytes <= profile.device_bytes


@pytest.mark.parametrize("old, new, field", [
    ("prefetch_depth = 1", "prefetch_depth = 1\nturbo = true", "plan.turbo"),
    ("expert_bits = 4", "expert_bits = 5", "plan.expert_bits"),
    ('vram = "11GiB"', 'vram = "lots"', "plan.vram"),
    ('vram = "11GiB"', 'vram = "13GiB"', "plan.vram"),
    ('policy = "combined"', 'policy = "fastest"', "plan.policy"),
    ("cpu_threads = 16", 'cpu_threads = "16"', "machine.cpu_threads"),
])
def test_bad_profiles_name_file_and_field(tmp_path, old, new, field):
    path = tmp_path / "bad.toml"
    assert old in GOOD
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(SettingError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message and field in message and "\n" not in message


def test_save_load_round_trip(tmp_path):
    for name in SHIPPED:
        profile = load_profile(name)
        path = save_profile(profile, tmp_path / f"{name}.toml")
        again = load_profile(path)
        assert again.tables() == profile.tables() and again.comment == profile.comment
    assert not list(tmp_path.glob(".*.tmp"))


def test_cpu_only_plan_loads_the_demo_model():
    kwargs = engine_kwargs(load_profile("cpu-only"))
    assert kwargs["device"] == "cpu"
    engine = Engine.load(DEMO_MODEL_DIR, **dict(kwargs, context_length=64, vram="64MiB"))  # short context: fast
    assert engine.plan is not None and engine.plan.slots_per_layer == engine.config.num_local_experts
    engine.close()
    assert Engine.load(DEMO_MODEL_DIR, **dict(kwargs, context_length=64)).plan is None  # as shipped: resident


def test_probe_best_and_fit():
    machine = probe_machine(DEMO_MODEL_DIR, device="cpu", copy_bytes=2**20, read_bytes=2**20)
    assert machine["ram"] > 0 and machine["h2d_gbps"] > 0 and machine["disk_gbps"] > 0
    assert best_shipped_profile("cpu").name == "cpu-only"
    import torch
    cuda = torch.device("cuda")
    assert best_shipped_profile(cuda, vram_total=int(11.6 * 2**30)).name == "rtx-3060-12gb"
    assert best_shipped_profile(cuda, vram_total=int(23.6 * 2**30)).name == "rtx-4090-24gb"
    with pytest.raises(SettingError, match="needs a GPU"):
        does_it_fit(load_profile("rtx-4060-8gb"), machine)
    does_it_fit(load_profile("cpu-only"), dict(machine, ram=64 * 2**30))
    with pytest.raises(SettingError, match="plan.ram"):
        does_it_fit(load_profile("rtx-4090-24gb"), dict(machine, gpu="x", vram=24 * 2**30, ram=16 * 2**30))


def test_profile_command_writes_a_profile_that_reads_back(tmp_path):
    from cli.profile import profile_command

    app = typer.Typer()
    app.command()(profile_command)
    out = tmp_path / "this-machine.toml"
    result = CliRunner().invoke(app, ["--out", str(out), "--device", "cpu", "-p", "4", "-n", "2"])
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    assert profile.gpu == "none" and profile.policy in ("lru", "auto") and profile.plan_vram is not None
    bad = CliRunner().invoke(app, ["--out", str(out), "--from", "no-such-profile"])
    assert bad.exit_code == 2
