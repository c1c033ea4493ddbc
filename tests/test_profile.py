"""Machine profiles: shipped files load, bad files are refused naming file and field, round trip,
the cpu-only plan loads the demo model, and `offload profile` writes a profile that reads back."""

from dataclasses import replace
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
    ("context = 4096", "context = 4096\nkv_bits = 4", "plan.kv_bits"),
    ("context = 4096", 'context = 4096\nkv_bits = "8"', "plan.kv_bits"),
    ("context = 4096", "context = 4096\nkv_bits = true", "plan.kv_bits"),
    ("ram_gbps = 65.0", 'ram_gbps = 65.0\nsdpa = "flash"', "machine.sdpa"),
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
    result = CliRunner().invoke(
        app, [str(DEMO_MODEL_DIR), "--out", str(out), "--device", "cpu", "-p", "4", "-n", "2", "-r", "1"]
    )
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    assert profile.gpu == "none" and profile.policy in ("lru", "combined") and profile.plan_vram is not None
    bad = CliRunner().invoke(app, ["--out", str(out), "--from", "no-such-profile"])
    assert bad.exit_code == 2


def test_chat_runs_with_the_profile_that_offload_profile_wrote(tmp_path, monkeypatch):
    import cli.common
    from cli.main import app

    out = tmp_path / "this-machine.toml"
    wrote = CliRunner().invoke(
        app, ["profile", str(DEMO_MODEL_DIR), "--out", str(out), "--device", "cpu", "-p", "4", "-n", "2", "-r", "1"]
    )
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
    assert profile.vram == "0" and settings["ram"] == profile.plan_ram == "0"  # no GPU: a RAM budget, nothing beside
    assert (settings["policy"], settings["expert_bits"], settings["attn_bits"]) == (
        profile.policy, profile.expert_bits, profile.attn_bits)
    assert settings["max_context"] == profile.context


# ---- the automatic profile: fitting a shipped plan to a model --------------------------------


def test_fit_mixtral_on_a_3060_keeps_the_4_bit_plan_with_a_cache_budget():

    from offload.plan import builtin_model
    from offload.profile_fit import fit_profile
    from tests.test_kv_plan import EMBEDDINGS, NF4_DQ_EXPERT, dense_by_hand, nf4_dq_matrix
    from tests.test_plan import mixtral_reserve_by_hand

    name, config = builtin_model("mixtral-8x7b")
    fitted, reason = fit_profile(load_profile("rtx-3060-12gb"), config, model_name=name)
    assert (fitted.expert_bits, fitted.attn_bits) == (4, 4)  # 8 and 16 bits would not be resident
    assert (fitted.plan_vram, fitted.plan_ram, fitted.context) == ("11GiB", "24GiB", 4096)
    # by hand: 11 GiB less the dense weights on the card (nf4-dq attention; the embeddings stay in
    # RAM), the bf16 KV cache at 4096 and the runtime reserve, in nf4-dq records (--expert-bits 4)
    dense = dense_by_hand(nf4_dq_matrix) - EMBEDDINGS
    spare = 11 * 2**30 - dense - 2 * 32 * 8 * 4096 * 128 * 2
    slots = (spare - sum(mixtral_reserve_by_hand(4096, 256, True).values())) // NF4_DQ_EXPERT
    assert slots == 105  # 3 a layer and 9 spare
    assert reason == f"4-bit weights, 3-4/8 experts per layer on the device ({105 / 32:.2f} on average), the rest in RAM"
    fitted, reason = fit_profile(load_profile("cpu-only"), config, model_name=name)
    assert fitted.expert_bits == 4 and fitted.plan_vram is None and "every expert resident" in reason


def test_fit_mixtral_on_the_8_gb_card_holds_top_2_and_fails_at_a_long_context_naming_the_budget():
    """At context 1024 top-2 nf4-dq experts a layer, the dense weights on the card (the embeddings
    in RAM), the KV cache and the reserve at chunks of 256 take 7.14 GiB: the 4060's 7.4 GiB plan
    holds 67 slots. At context 16384 (a 2 GiB KV cache) the least, in chunks of 16, is 8.97 GiB:
    no plan at any width."""
    from offload.errors import BudgetError
    from offload.plan import builtin_model
    from offload.profile_fit import fit_profile
    from tests.test_kv_plan import EMBEDDINGS, NF4_DQ_EXPERT, dense_by_hand, nf4_dq_matrix
    from tests.test_plan import mixtral_reserve_by_hand

    name, config = builtin_model("mixtral-8x7b")
    dense = dense_by_hand(nf4_dq_matrix) - EMBEDDINGS
    kv = 2 * 32 * 8 * 1024 * 128 * 2
    slots = (int(7.4 * 2**30) - dense - kv - sum(mixtral_reserve_by_hand(1024, 256, True).values())) // NF4_DQ_EXPERT
    assert slots == 67
    fitted, reason = fit_profile(load_profile("rtx-4060-8gb"), config, model_name=name)
    assert (fitted.expert_bits, fitted.attn_bits, fitted.context) == (4, 4, 1024)
    assert int(7.39 * 2**30) <= fitted.plan_vram_bytes <= int(7.4 * 2**30)  # the plan's budget, written to 0.01 GiB
    assert reason == f"4-bit weights, 2-3/8 experts per layer on the device ({67 / 32:.2f} on average), the rest in RAM"
    least = (dense + 2 * 32 * 8 * 16384 * 128 * 2 + 64 * NF4_DQ_EXPERT
             + sum(mixtral_reserve_by_hand(16384, 16, True).values()))
    assert f"{least / 2**30:.2f}" == "8.97"
    with pytest.raises(BudgetError, match=r"plan.vram: Mixtral-8x7B needs at least 8.97 GiB .* 7.40 GiB"):
        fit_profile(load_profile("rtx-4060-8gb"), config, model_name=name, context=16384)


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
    -> 75 GiB). 16-bit experts would need a cache there (every one needs 84 GiB), and on a GPU
    a width wider than the profile's wins only when it makes every expert resident; at 8 bits
    every expert fits on the card: no budget and a plain run's context, with 256 GiB of RAM or
    64. The 3060's own size keeps its plan as written."""
    from offload.plan import builtin_model
    from offload.profile_fit import fit_profile

    name, config = builtin_model("mixtral-8x7b")
    profile = load_profile("rtx-4090-24gb")
    for ram in (256, 64):
        fitted, reason = fit_profile(profile, config, model_name=name, machine={"vram": 80 * 2**30, "ram": ram * 2**30})
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
    fitted, reason = fit_profile(profile, config, experts_per_layer=4)  # a cache asked for, on a GPU: nf4
    assert (fitted.expert_bits, fitted.experts_per_layer) == (4, 4) and "4/8 experts per layer" in reason


def test_a_cpu_profile_keeps_the_widest_width_that_fits_with_a_cache():
    """The GPU rule (nf4 unless wider weights make every expert resident) is not the CPU's:
    with a cache asked for, the cpu-only profile on a 256 GiB machine still takes 16 bits, while
    the 24 GB card's profile on a card as large takes 4."""
    from offload.plan import builtin_model
    from offload.profile_fit import fit_profile

    name, config = builtin_model("mixtral-8x7b")
    big = {"vram": 0, "ram": 256 * 2**30}
    fitted, reason = fit_profile(load_profile("cpu-only"), config, model_name=name, experts_per_layer=4, machine=big)
    assert fitted.expert_bits == 16 and "4/8 experts per layer" in reason
    card = {"vram": 256 * 2**30, "ram": 256 * 2**30}
    fitted, _ = fit_profile(load_profile("rtx-4090-24gb"), config, model_name=name, experts_per_layer=4, machine=card)
    assert fitted.expert_bits == 4


# ---- the memory bandwidth field ------------------------------------------------------------------


def test_shipped_profiles_state_the_published_memory_bandwidth():
    published = {"rtx-4060-8gb": 272.0, "rtx-3060-12gb": 360.0, "t4-16gb": 320.0, "rtx-4090-24gb": 1008.0,
                 "cpu-only": 2 * 8 * 5600 / 1000}  # dual-channel DDR5-5600: 89.6 GB/s
    for name, gbps in published.items():
        assert load_profile(name).mem_gbps == pytest.approx(gbps)


def test_a_profile_without_memory_bandwidth_still_loads(tmp_path):
    old = tmp_path / "old.toml"
    lines = [line for line in GOOD.splitlines() if not line.startswith("mem_gbps")]
    old.write_text("\n".join(lines) + "\n")
    profile = load_profile(old)
    assert profile.mem_gbps is None and "mem_gbps" not in profile.tables()["machine"]
    again = load_profile(save_profile(profile, tmp_path / "again.toml"))
    assert again.mem_gbps is None
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("mem_gbps = 360.0", "mem_gbps = 0", 1))
    with pytest.raises(SettingError, match="machine.mem_gbps") as info:
        load_profile(bad)
    assert str(bad) in str(info.value)


def test_fit_a_packs_format_says_the_packs_own_bits():
    """A pack fixes its experts' format: the fitted profile's expert_bits must be that format's
    width, or the engine refuses the profile's --expert-bits against the pack."""
    from offload.config import ModelConfig
    from offload.loader import _bits_agree
    from offload.profile_fit import fit_profile
    from offload.quant import get_format

    config = ModelConfig.from_dir(DEMO_MODEL_DIR)
    for fmt, bits in (("nf4", 4), ("int8", 8), ("bf16", 16)):
        fitted, reason = fit_profile(load_profile("cpu-only"), config, expert_format=fmt)
        assert fitted.expert_bits == bits and _bits_agree(fitted.expert_bits, get_format(fmt)), reason


# ---- the host's fields for CPU experts ------------------------------------------------------------


def test_shipped_card_profiles_state_the_hosts_ram_and_where_misses_run():
    for name in ("rtx-3060-12gb", "rtx-4060-8gb", "rtx-4090-24gb"):  # desktops with dual-channel DDR5
        profile = load_profile(name)
        assert profile.ram_gbps == 65.0 and profile.cpu_experts == "auto"
        assert engine_kwargs(profile)["cpu_experts"] == "auto"
    for name in ("t4-16gb", "cpu-only"):  # a cloud VM's share is not stated; a CPU's RAM is mem_gbps
        profile = load_profile(name)
        assert profile.ram_gbps is None and profile.cpu_experts is None
        assert "cpu_experts" not in engine_kwargs(profile)  # the engine's default


def test_the_host_fields_round_trip_and_old_profiles_still_read(tmp_path):
    text = GOOD.replace("mem_gbps = 360.0", "mem_gbps = 360.0\ncpu_expert_gbps = 41.5\ngpu_expert_gbps = 230.0\n"
                        "round_trip_ms = 0.25", 1)
    text = text.replace('cpu_experts = "auto"', 'cpu_experts = "off"', 1)
    path = tmp_path / "host.toml"
    path.write_text(text)
    profile = load_profile(path)
    assert (profile.ram_gbps, profile.cpu_expert_gbps, profile.round_trip_ms, profile.cpu_experts) == (
        65.0, 41.5, 0.25, "off")
    again = load_profile(save_profile(profile, tmp_path / "again.toml"))
    assert again.tables() == profile.tables()
    assert again.tables()["machine"]["round_trip_ms"] == 0.25 and again.tables()["plan"]["cpu_experts"] == "off"
    assert again.gpu_expert_gbps == 230.0
    old = tmp_path / "old.toml"
    old.write_text("\n".join(line for line in GOOD.splitlines()
                             if not line.startswith(("ram_gbps", "cpu_experts"))) + "\n")
    before = load_profile(old)
    assert before.ram_gbps is None and before.cpu_experts is None
    assert "ram_gbps" not in before.tables()["machine"] and "cpu_experts" not in before.tables()["plan"]


@pytest.mark.parametrize("old, new, field", [
    ('cpu_experts = "auto"', 'cpu_experts = "sometimes"', "plan.cpu_experts"),
    ('cpu_experts = "auto"', "cpu_experts = 1", "plan.cpu_experts"),
    ("ram_gbps = 65.0", "ram_gbps = 0", "machine.ram_gbps"),
    ("ram_gbps = 65.0", "ram_gbps = inf", "machine.ram_gbps"),
    ("ram_gbps = 65.0", 'ram_gbps = 65.0\ncpu_expert_gbps = "fast"', "machine.cpu_expert_gbps"),
    ("ram_gbps = 65.0", "ram_gbps = 65.0\nround_trip_ms = -1", "machine.round_trip_ms"),
    ("ram_gbps = 65.0", "ram_gbps = 65.0\ngpu_expert_gbps = -3", "machine.gpu_expert_gbps"),
])
def test_bad_host_fields_name_file_and_field(tmp_path, old, new, field):
    path = tmp_path / "bad.toml"
    assert old in GOOD
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(SettingError) as info:
        load_profile(path)
    assert str(path) in str(info.value) and field in str(info.value)


# ---- the costs the placement model takes, measured -----------------------------------------------


def test_the_probe_measures_the_cpu_side_costs_and_the_profile_keeps_them(tmp_path):
    from offload.kernels import cpu4
    from offload.profile import machine_profile

    machine = probe_machine(device="cpu", copy_bytes=2**20, compute=True)
    assert machine["ram_gbps"] > 0
    if cpu4.status().path == "torch":
        assert machine["cpu_expert_gbps"] is None
    else:  # the kernel on one w1-sized matrix reads at a real speed, below a sane ceiling
        assert 0.05 < machine["cpu_expert_gbps"] < 2000
    assert machine["gpu_expert_gbps"] is None and machine["round_trip_ms"] is None  # no GPU, no trip
    assert "ram_gbps" not in probe_machine(device="cpu", copy_bytes=0)  # not asked: not measured
    profile = machine_profile(machine, load_profile("cpu-only"), "here")
    again = load_profile(save_profile(profile, tmp_path / "here.toml"))
    assert again.ram_gbps == machine["ram_gbps"] and again.cpu_expert_gbps == machine["cpu_expert_gbps"]
    assert again.gpu_expert_gbps is None and "gpu_expert_gbps" not in again.tables()["machine"]
    assert again.mem_gbps == machine["ram_gbps"]  # without a GPU the device memory is the RAM measured


def test_a_gpu_profile_hands_its_measured_costs_to_the_engines_placer():
    import torch

    from offload.engine import make_placer
    from offload.experts.placement import Costs, default_costs

    card = load_profile("rtx-3060-12gb")
    assert engine_kwargs(card)["machine"] is card and "machine" not in engine_kwargs(load_profile("cpu-only"))

    class Layout:
        nbytes = 99_090_432  # a 4-bit Mixtral expert record

    class Config:
        num_experts_per_tok = 2

    class Cache:
        def prefetch_in_flight(self):
            return False

    cuda = torch.device("cuda")  # a device object only: nothing here touches CUDA
    assert make_placer(torch.device("cpu"), Layout(), Config(), card) is None  # a CPU runs misses in place
    # a fast measured CPU kernel: a lone miss runs on the CPU; a slow one: over the link
    fast = replace(card, cpu_expert_gbps=500.0, gpu_expert_gbps=300.0)
    slow = replace(card, cpu_expert_gbps=0.5, gpu_expert_gbps=300.0)
    assert Costs.from_profile(fast, Layout.nbytes).cpu_s < Costs.from_profile(fast, Layout.nbytes).link_s
    assert make_placer(cuda, Layout(), Config(), fast)(0, [5], Cache()) == [5]
    assert make_placer(cuda, Layout(), Config(), slow)(0, [5], Cache()) == []
    # a profile missing a figure: the stated defaults, and a note naming the field
    notes: list[str] = []
    bare = replace(card, ram_gbps=None, cpu_expert_gbps=None)
    placer = make_placer(cuda, Layout(), Config(), bare, notes)
    assert len(notes) == 1 and "machine.ram_gbps or machine.cpu_expert_gbps" in notes[0]
    want = engine_placer_choice(default_costs(Layout.nbytes), Layout, Config, Cache)
    assert placer(0, [5], Cache()) == want


def test_without_the_cpu_kernel_auto_keeps_every_miss_on_the_gpu_and_says_why(monkeypatch):
    import torch

    from offload.engine import make_placer
    from offload.kernels import cpu4

    monkeypatch.setattr(cpu4, "status", lambda: cpu4.KernelStatus("torch", (), "no C compiler found"))

    class Layout:
        nbytes = 99_090_432

    class Config:
        num_experts_per_tok = 2

    notes: list[str] = []
    fast = replace(load_profile("rtx-3060-12gb"), cpu_expert_gbps=500.0)  # even a profile that says it is fast
    placer = make_placer(torch.device("cuda"), Layout(), Config(), fast, notes)
    assert placer(0, [1, 5], None) == [] and placer(0, [3], None, tokens=1) == []
    assert notes == ["--cpu-experts auto: every miss runs on the GPU: no C compiler found"]


def engine_placer_choice(costs, layout, config, cache):
    from offload.experts.placement import engine_placer

    return engine_placer("cuda", layout(), config(), costs)(0, [5], cache())


# ---- the KV cache's width and the card's attention kernel (issue 17) ---------------------------


def test_kv_bits_and_sdpa_default_round_trip_and_reach_the_plan(tmp_path):
    """plan.kv_bits (16 or 8, absent: 16) and machine.sdpa ("fused" or "math", absent: fused) read,
    write back only when not the default, go to Engine.load (kv_bits 8 only) and size the fit."""
    from offload.plan import builtin_model
    from offload.profile_fit import fit_profile

    plain = load_profile("rtx-3060-12gb")
    assert (plain.kv_bits, plain.sdpa) == (16, "fused") and "kv_bits" not in engine_kwargs(plain)
    assert "kv_bits" not in plain.tables()["plan"] and "sdpa" not in plain.tables()["machine"]
    assert load_profile("t4-16gb").sdpa == "math"  # Turing: no flash kernel
    path = tmp_path / "kv8.toml"
    # a 10.5 GiB plan at 32k: 9.20 GiB the least with an 8-bit KV cache, 10.97 GiB with a 16-bit one
    # (tests/test_kv_plan.py's 32k figures by hand)
    path.write_text(GOOD.replace('context = 4096', 'context = 32768\nkv_bits = 8', 1)
                    .replace('vram = "11GiB"', 'vram = "10.5GiB"', 1))
    eight = load_profile(path)
    assert eight.kv_bits == 8 and engine_kwargs(eight)["kv_bits"] == 8
    again = load_profile(save_profile(eight, tmp_path / "again.toml"))
    assert again.kv_bits == 8 and again.tables() == eight.tables()
    name, config = builtin_model("mixtral-8x7b")
    fitted, reason = fit_profile(eight, config, model_name=name)  # 10.5 GiB at 32k: fits only at 8 bits
    assert fitted.kv_bits == 8 and fitted.context == 32768 and "2-3/8 experts per layer" in reason
    with pytest.raises(SettingError, match="plan.vram"):
        fit_profile(eight, config, model_name=name, kv_bits=16)  # the flag's 16 bits: 4 GiB of KV cache
    fused = fit_profile(plain, config, model_name=name)[1]  # the reasons name the slots
    assert "(3.28 on average)" in fused  # 105 slots (test_fit_mixtral_on_a_3060_keeps_the_4_bit_plan_...)
    # the math path's fp32 scores and head-expanded k/v: 99 slots by hand (tests/test_plan.py's reserve)
    assert "(3.09 on average)" in fit_profile(replace(plain, sdpa="math"), config, model_name=name)[1]
