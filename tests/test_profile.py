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
    assert profile.gpu == "none" and profile.policy in ("lru", "combined") and profile.plan_vram is not None
    bad = CliRunner().invoke(app, ["--out", str(out), "--from", "no-such-profile"])
    assert bad.exit_code == 2


def test_chat_runs_with_the_profile_that_offload_profile_wrote(tmp_path, monkeypatch):
    import cli.common
    from cli.main import app

    out = tmp_path / "this-machine.toml"
    wrote = CliRunner().invoke(app, ["profile", "--out", str(out), "--device", "cpu", "-p", "4", "-n", "2"])
    assert wrote.exit_code == 0, wrote.output
    profile = load_profile(out)
    loaded: list[dict] = []
    real = cli.common.load_engine

    def spy(model, **settings):
        loaded.append(settings)
        return real(model, **settings)

    monkeypatch.setattr(cli.common, "load_engine", spy)
    chat = CliRunner().invoke(app, ["chat", "--profile", str(out), "-n", "4", "--temp", "0"], input="hello")
    assert chat.exit_code == 0, chat.output
    assert chat.stdout.strip()  # a reply
    settings = loaded[0]
    assert settings["device"] == "cpu" and settings["vram"] == profile.plan_vram
    assert (settings["policy"], settings["expert_bits"], settings["attn_bits"]) == (
        profile.policy, profile.expert_bits, profile.attn_bits)
    assert settings["max_context"] == profile.context


# ---- the automatic profile: fitting a shipped plan to a model --------------------------------


def test_fit_mixtral_on_a_3060_keeps_the_4_bit_plan_with_a_cache_budget():
    from offload.plan import builtin_model
    from offload.profile_fit import fit_profile

    name, config = builtin_model("mixtral-8x7b")
    fitted, reason = fit_profile(load_profile("rtx-3060-12gb"), config, model_name=name)
    assert (fitted.expert_bits, fitted.attn_bits) == (4, 4)  # 8 and 16 bits do not fit 11 GiB + 24 GiB
    assert (fitted.plan_vram, fitted.plan_ram, fitted.context) == ("11GiB", "24GiB", 4096)
    assert "3/8 experts per layer" in reason and "\n" not in reason
    fitted, reason = fit_profile(load_profile("cpu-only"), config, model_name=name)
    assert fitted.expert_bits == 4 and fitted.plan_vram is None and "every expert resident" in reason


@pytest.mark.parametrize("profile", ["cpu-only", "rtx-4060-8gb", "rtx-4090-24gb"])
def test_fit_a_small_model_runs_16_bit_with_no_budget(profile):
    from offload.config import ModelConfig
    from offload.profile_fit import fit_profile

    config = ModelConfig.from_dir(DEMO_MODEL_DIR)
    fitted, reason = fit_profile(load_profile(profile), config)
    assert (fitted.expert_bits, fitted.attn_bits) == (16, 16)
    assert fitted.plan_vram is None and fitted.plan_ram is None and fitted.experts_per_layer is None
    assert fitted.policy == "auto"  # no cache: flags that add a budget behave as without a profile
    kwargs = engine_kwargs(fitted)
    assert kwargs["vram"] is kwargs["ram"] is kwargs["experts_per_layer"] is None  # every expert resident
    assert reason == "16-bit weights, every expert resident, no budget"


def test_fit_that_fails_names_the_field():
    from offload.errors import BudgetError
    from offload.plan import builtin_model
    from offload.profile_fit import fit_profile

    name, config = builtin_model("mixtral-8x7b")
    with pytest.raises(BudgetError, match="machine.ram: Mixtral-8x7B needs at least") as info:
        fit_profile(load_profile("cpu-only"), config, model_name=name, machine={"ram": 4 * 2**30, "vram": 0})
    assert "\n" not in str(info.value)


def test_auto_profile_fits_or_falls_back_to_plain_defaults(tmp_path):
    from offload.profile_fit import auto_profile

    fitted, reason = auto_profile(DEMO_MODEL_DIR, "cpu")
    assert fitted is not None and fitted.name == "cpu-only" and fitted.expert_bits == 16
    assert reason.startswith("auto: best shipped profile for this CPU; 16-bit weights")
    nothing, reason = auto_profile(tmp_path / "absent", "cpu")  # the engine reports the model's error
    assert nothing is None and reason.endswith("plain defaults") and "absent" in reason


def test_engine_kwargs_carry_the_prefetch_depth(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text(GOOD.replace("prefetch_depth = 1", "prefetch_depth = 3"))
    assert engine_kwargs(load_profile(path))["prefetch_depth"] == 3


def test_an_installed_wheel_finds_its_profiles(tmp_path):
    """The lookup an installed (non-editable) package takes: no checkout next to the package, the
    profiles installed as data files under <prefix>/share/offload/profiles, found through the
    distribution's RECORD as importlib.metadata reads it. pyproject.toml installs them there."""
    import importlib.metadata
    import shutil
    import tomllib

    from offload.profile import PROFILES_DATA_DIR, PROFILES_DIR, find_profiles_dir

    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["data-files"] == {"/".join(PROFILES_DATA_DIR): ["profiles/*.toml"]}
    prefix = tmp_path / "prefix"
    site = prefix / "lib" / "python3" / "site-packages"
    (site / "offload").mkdir(parents=True)
    data = prefix.joinpath(*PROFILES_DATA_DIR)
    data.mkdir(parents=True)
    record = []
    for toml in sorted(PROFILES_DIR.glob("*.toml")):
        shutil.copy(toml, data / toml.name)
        record.append(f"../../../{'/'.join(PROFILES_DATA_DIR)}/{toml.name},,")
    info = site / "offload-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: offload\nVersion: 0.1.0\n")
    (info / "RECORD").write_text("offload/__init__.py,,\n" + "\n".join(record) + "\n")
    found = find_profiles_dir(site / "offload", importlib.metadata.PathDistribution(info))
    assert found == data.resolve()
    assert sorted(p.stem for p in found.glob("*.toml")) == shipped_profiles()
    assert set(SHIPPED) <= set(shipped_profiles())
    assert find_profiles_dir() == root / "profiles"  # this checkout: the repository's folder


def test_fit_scales_the_profile_to_a_bigger_machine_and_keeps_a_plain_context():
    """An 80 GiB card picks the 24 GB profile, whose budgets scale to the card (22.5 of 24 GiB
    -> 75 GiB): with 256 GiB of RAM Mixtral-8x7B runs at 16 bits, 6 of 8 experts per layer on
    the card; with 64 GiB the 16-bit experts have no room in RAM, and at 8 bits every expert
    fits on the card: no budget, and a plain run's context."""
    from offload.plan import builtin_model
    from offload.profile_fit import fit_profile

    name, config = builtin_model("mixtral-8x7b")
    profile = load_profile("rtx-4090-24gb")
    fitted, reason = fit_profile(profile, config, model_name=name, machine={"vram": 80 * 2**30, "ram": 256 * 2**30})
    assert (fitted.expert_bits, fitted.plan_vram) == (16, "75GiB") and "6/8 experts per layer" in reason
    fitted, reason = fit_profile(profile, config, model_name=name, machine={"vram": 80 * 2**30, "ram": 64 * 2**30})
    assert (fitted.expert_bits, fitted.plan_vram, fitted.context) == (8, None, 4096), reason
    assert "every expert resident" in reason
    small = {"vram": 12 * 2**30, "ram": 32 * 2**30}  # the 3060's own size: its plan as written
    fitted, _ = fit_profile(load_profile("rtx-3060-12gb"), config, model_name=name, machine=small)
    assert (fitted.expert_bits, fitted.plan_vram, fitted.plan_ram) == (4, "11GiB", "24GiB")


def test_fit_uses_the_budgets_given_by_flags():
    from offload.config import ModelConfig
    from offload.errors import BudgetError
    from offload.profile_fit import fit_profile

    config = ModelConfig.from_dir(DEMO_MODEL_DIR)
    profile = load_profile("rtx-4090-24gb")
    with pytest.raises(BudgetError, match="--vram: .* needs at least"):
        fit_profile(profile, config, vram=2**20)
    fitted, reason = fit_profile(profile, config, experts_per_layer=4)  # a cache asked for: 16 bits still fit
    assert (fitted.expert_bits, fitted.experts_per_layer) == (16, 4) and "4/8 experts per layer" in reason
