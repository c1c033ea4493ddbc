"""The decode estimate: its formula on hand-computed cases, hit rates replayed independently on
the shared traces, and `offload info` printing it for each shipped profile."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from offload import quant
from offload.config import ModelConfig
from offload.errors import SettingError
from offload.estimate import (
    CPU_CONVERT_WEIGHTS_PER_S,
    LAYER_OVERHEAD_S,
    Machine,
    estimate_decode,
    estimate_plan,
    matrix_seconds,
    touched_bytes,
)
from offload.experts.record import RecordLayout
from offload.plan import builtin_model, plan_memory, plan_model
from offload.profile import load_profile, shipped_profiles
from offload.trace import MIXTRAL_DECODE

needs_traces = pytest.mark.skipif(not MIXTRAL_DECODE.is_file(), reason="the shared Mixtral traces are not here")

# 2 layers, D 64, I 128, 4 heads / 2 KV heads of 16, 4 experts, top-1, vocabulary 100: not
# Mixtral's shape, and not 8 experts top-2, so its hit rates are a uniform router's slots / E.
TINY_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_local_experts": 4, "num_experts_per_tok": 1, "max_position_embeddings": 256, "rope_theta": 1e4,
    "rms_norm_eps": 1e-5, "sliding_window": None, "tie_word_embeddings": False,
}
TINY = ModelConfig.from_dict(TINY_CONFIG, source="test")
MACHINE = Machine("cuda", mem_gbps=1.0, link_gbps=0.25, disk_gbps=0.1, efficiency=0.5, layer_overhead_s=1e-3)


def tiny_plan(**budget):
    record = RecordLayout.for_config(TINY, "fp32").nbytes
    return plan_memory(TINY, record, torch.float32, 64, **budget)


def test_the_formula_by_hand():
    plan = tiny_plan(experts_per_layer=2, ram=6 * 98_304)
    assert plan.expert_bytes == 98_304 and plan.host_experts == 6  # 3 fp32 [128, 64] matrices; 6 of 8 in RAM
    got = estimate_decode(TINY, plan, MACHINE, dtype=torch.float32, expert_format="fp32", attn_format="fp32",
                          position=10)
    bandwidth = 1e9 * 0.5
    attention = (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64) * 4  # q, k, v, o in fp32: 49,152 B
    small = (4 * 64 + 2 * 64) * 4  # router and two norms
    kv = 2 * 2 * 16 * 10 * 4  # K and V of 2 heads of 16 at 10 positions
    expert = 3 * 128 * 64 * 4  # top-1
    compute = (attention + small + kv + expert) / bandwidth + 1e-3  # 1.303104 ms
    head = (100 * 64 * 4 + 64 * 4) / bandwidth
    hit = 2 / 4  # a uniform router: slots / experts
    disk = 1 - 6 / 8
    per_miss = 98_304 * ((1 - disk) / 0.25e9 + disk * (1 / 0.1e9 + 1 / 0.25e9))  # from RAM, or disk then link
    load = 1 * (1 - hit) * per_miss
    assert compute == pytest.approx(1.303104e-3) and load == pytest.approx(319.488e-6)
    assert got.seconds_per_token == pytest.approx(head + 2 * (compute + load))
    assert got.tokens_per_s == pytest.approx(1 / 3.296896e-3)
    assert got.overlap_tokens_per_s == pytest.approx(1 / (head + 2 * compute))  # loads shorter than compute
    assert got.misses_per_token == pytest.approx(1.0) and got.disk_share == pytest.approx(0.25)
    assert got.hit_source.startswith("a uniform router")
    line = got.describe()
    assert line.startswith("estimate: 303.3 tok/s decode") and "\n" not in line


def test_a_cpu_machine_reads_disk_straight_into_its_slots_and_resident_plans_load_nothing():
    plan = tiny_plan(experts_per_layer=2, ram=0)  # every miss reads the pack
    cpu = Machine("cpu", mem_gbps=1.0, link_gbps=0.25, disk_gbps=0.1, efficiency=0.5, layer_overhead_s=1e-3)
    got = estimate_decode(TINY, plan, cpu, dtype=torch.float32, expert_format="fp32", attn_format="fp32")
    assert got.disk_share == 1.0
    assert got.load_s == pytest.approx(2 * 0.5 * 98_304 / 0.1e9)  # no link after the read on a CPU
    resident = tiny_plan()  # no budget: every expert has a slot
    got = estimate_decode(TINY, resident, cpu, dtype=torch.float32, expert_format="fp32", attn_format="fp32")
    assert got.load_s == 0 and got.misses_per_token == 0 and got.hit_source == "every expert resident"
    assert got.tokens_per_s == pytest.approx(1 / got.compute_s)


def test_touched_bytes_and_conversion_per_format():
    shape = (128, 64)
    n = 128 * 64
    for fmt in ("nf4", "fp4", "nf4-dq"):  # bitsandbytes' CUDA kernel and offload's CPU kernel read the codes
        for device_type in ("cuda", "cpu"):
            assert touched_bytes(shape, fmt, torch.bfloat16, device_type) == quant.matrix_bytes(shape, fmt)
    assert matrix_seconds(shape, "nf4", torch.bfloat16, Machine("cpu", mem_gbps=2.0, efficiency=1.0)) == (
        pytest.approx(quant.matrix_bytes(shape, "nf4") / 2e9))  # no conversion priced
    # int8 casts the whole matrix to the compute dtype on every call: written once, read once
    assert touched_bytes(shape, "int8", torch.bfloat16, "cuda") == quant.matrix_bytes(shape, "int8") + 2 * n * 2
    assert touched_bytes(shape, "bf16", torch.bfloat16, "cpu") == n * 2
    cpu = Machine("cpu", mem_gbps=2.0, efficiency=1.0)
    converted = (quant.matrix_bytes(shape, "int8") + 4 * n) / 2e9 + n / CPU_CONVERT_WEIGHTS_PER_S
    assert matrix_seconds(shape, "int8", torch.bfloat16, cpu) == pytest.approx(converted)
    assert matrix_seconds(shape, "bf16", torch.bfloat16, cpu) == pytest.approx(2 * n / 2e9)


def test_a_measured_expert_time_replaces_the_bandwidth_model():
    plan = tiny_plan(experts_per_layer=4)
    measured = Machine("cpu", mem_gbps=1.0, efficiency=0.5, layer_overhead_s=0.0, expert_seconds=0.01)
    plain = Machine("cpu", mem_gbps=1.0, efficiency=0.5, layer_overhead_s=0.0)
    a = estimate_decode(TINY, plan, measured, dtype=torch.float32, expert_format="fp32", attn_format="fp32")
    b = estimate_decode(TINY, plan, plain, dtype=torch.float32, expert_format="fp32", attn_format="fp32")
    assert a.compute_s - b.compute_s == pytest.approx(2 * (0.01 - 3 * 128 * 64 * 4 / 0.5e9))


# ---- CPU experts: the placement cost model per layer ------------------------------------------

# the machine above with a host: RAM 0.5 GB/s read by the CPU kernel at 0.5 of it (0.25 GB/s, a
# record in 393.216 us, like the link), a 0.1 ms round trip
HOST = Machine("cuda", mem_gbps=1.0, link_gbps=0.25, disk_gbps=0.1, efficiency=0.5, layer_overhead_s=1e-3,
               ram_gbps=0.5, cpu_efficiency=0.5, round_trip_s=1e-4)
US = 1e-6
DENSE = 1.106496e-3  # one TINY layer without its experts: 53,248 bytes at 0.5 GB/s + 1 ms
HEAD = 51.712 * US  # lm_head (100 x 64) and the final norm (64), fp32 at 0.5 GB/s


def test_cpu_experts_auto_prices_each_miss_with_the_placement_model_by_hand():
    plan = tiny_plan(experts_per_layer=2, ram=6 * 98_304)  # hit rate 1/2, a quarter of misses on disk
    got = estimate_decode(TINY, plan, HOST, dtype=torch.float32, expert_format="fp32", attn_format="fp32",
                          position=10, cpu_experts="auto")
    # per record: GPU 196.608 us, link 393.216, CPU 393.216, disk 983.04; top-1, so a layer has
    # 0 misses (1/2): the hit, 196.608; 1 miss in RAM (3/8): GPU 393.216 + 196.608 = 589.824
    # against CPU 393.216 + 100 = 493.216 -> CPU; 1 miss on disk (1/8): 983.04 + 589.824 against
    # 983.04 + 493.216 = 1476.256 -> CPU
    experts = 0.5 * 196.608 + 0.375 * 493.216 + 0.125 * 1476.256  # 467.792 us
    assert got.layers[0].dense_s == pytest.approx(DENSE)
    assert got.layers[0].hybrid_s == pytest.approx(DENSE + experts * US)
    assert got.seconds_per_token == pytest.approx(HEAD + 2 * (DENSE + experts * US))
    assert got.cpu_runs_per_token == pytest.approx(1.0)  # every miss on the CPU
    assert got.cpu_expert_s == pytest.approx(393.216 * US) and got.expert_s == pytest.approx(196.608 * US)
    assert got.transfer_tokens_per_s == pytest.approx(1 / 3.296896e-3)  # the serial figure, unchanged
    line = got.describe()
    assert line.startswith(f"estimate: {got.tokens_per_s:.1f} tok/s decode with --cpu-experts auto")
    assert "transfer only: 303.3 tok/s" in line and "\n" not in line
    # "all": the slots never fill, every use runs on the CPU: 3/4 from RAM, 1/4 read first
    every = estimate_decode(TINY, plan, HOST, dtype=torch.float32, expert_format="fp32", attn_format="fp32",
                            position=10, cpu_experts="all")
    assert every.seconds_per_token == pytest.approx(HEAD + 2 * (DENSE + (0.75 * 493.216 + 0.25 * 1476.256) * US))
    # "off" is the serial formula whatever the host
    off = estimate_decode(TINY, plan, HOST, dtype=torch.float32, expert_format="fp32", attn_format="fp32",
                          position=10, cpu_experts="off")
    assert off.tokens_per_s == pytest.approx(1 / 3.296896e-3) and off.cpu_runs_per_token == 0


def test_cpu_experts_with_top_2_sum_over_the_binomial_cases_by_hand():
    tiny2 = ModelConfig.from_dict(dict(TINY_CONFIG, num_experts_per_tok=2), source="test")
    plan = plan_memory(tiny2, 98_304, torch.float32, 64, experts_per_layer=2)  # every record in RAM
    got = estimate_decode(tiny2, plan, HOST, dtype=torch.float32, expert_format="fp32", attn_format="fp32",
                          position=10, cpu_experts="auto")
    # hit rate 1/2: 0 misses (1/4): two hits, 393.216 us; 1 miss (1/2): the hit on the GPU
    # (196.608), the miss copied (393.216, then 196.608: 589.824) or on the CPU (493.216) -> CPU;
    # 2 misses (1/4): copy both 983.04, one each max(589.824, 493.216) = 589.824, both on the CPU
    # 886.432 -> one each
    experts = 0.25 * 393.216 + 0.5 * 493.216 + 0.25 * 589.824  # 492.368 us
    assert got.layers[0].hybrid_s == pytest.approx(DENSE + experts * US)
    assert got.layers[0].cpu_runs == pytest.approx(0.5 + 0.25)


def test_a_cpu_device_computes_misses_in_ram_where_they_lie():
    plan = tiny_plan(experts_per_layer=2, ram=6 * 98_304)
    cpu = Machine("cpu", mem_gbps=1.0, link_gbps=0.25, disk_gbps=0.1, efficiency=0.5, layer_overhead_s=1e-3)
    got = estimate_decode(TINY, plan, cpu, dtype=torch.float32, expert_format="fp32", attn_format="fp32",
                          cpu_experts="auto")
    # no copy for a miss in RAM; a miss on disk (a quarter) is read: 1/2 x 1/4 x 983.04 us a layer
    layer = got.layers[0]
    assert layer.hybrid_s == pytest.approx(layer.compute_s + 0.125 * 983.04 * US)
    assert layer.cpu_runs == pytest.approx(0.375)


def test_cpu_experts_on_a_card_need_the_rams_bandwidth():
    plan = tiny_plan(experts_per_layer=2)
    with pytest.raises(SettingError, match="ram_gbps"):
        estimate_decode(TINY, plan, MACHINE, dtype=torch.float32, expert_format="fp32", attn_format="fp32",
                        cpu_experts="auto")
    resident = estimate_decode(TINY, tiny_plan(), MACHINE, dtype=torch.float32, expert_format="fp32",
                               attn_format="fp32", cpu_experts="auto")  # nothing to place: no need
    assert resident.tokens_per_s == pytest.approx(1 / resident.compute_s)
    with pytest.raises(SettingError, match="--cpu-experts"):
        estimate_decode(TINY, plan, HOST, dtype=torch.float32, expert_format="fp32", attn_format="fp32",
                        cpu_experts="some")
    measured = Machine("cuda", ram_gbps=None, cpu_expert_gbps=40.0)  # the kernel's GB/s replaces the RAM's
    assert measured.cpu_expert_seconds(99_090_624) == pytest.approx(99_090_624 / 40e9)
    with pytest.raises(SettingError, match="--ram-gbps"):
        Machine(ram_gbps=0.0)


@needs_traces
def test_mixtral_hit_rates_are_each_layers_own_lru_replay():
    from offload.trace import load_trace, simulate

    name, config = builtin_model("mixtral-8x7b")
    plan = plan_model(name, config, torch.bfloat16, 4096, "nf4", "bf16", vram=12 * 2**30, ram=32 * 2**30)
    m = plan.memory
    assert set(m.layer_slots) == {2, 3}
    machine = Machine("cuda", mem_gbps=360, link_gbps=25, disk_gbps=3.5)
    got = estimate_plan(plan, machine)
    trace = load_trace(MIXTRAL_DECODE)
    rates = {k: simulate(trace, k, "lru").layer_hit_rates() for k in (2, 3)}
    want = [rates[s][layer] for layer, s in enumerate(m.layer_slots)]
    assert [layer.hit_rate for layer in got.layers] == pytest.approx(want)
    assert got.load_s == pytest.approx(sum(2 * (1 - h) for h in want) * m.expert_bytes / 25e9)  # all in RAM
    assert got.hit_source == "LRU on the Mixtral-8x7B traces"
    assert LAYER_OVERHEAD_S["cuda"] == machine.layer_overhead_s


@needs_traces
def test_another_shape_with_8_experts_top_2_borrows_mixtrals_mean():
    from offload.trace import load_trace, simulate

    name, config = builtin_model("mixtral-8x22b")  # 56 layers
    plan = plan_model(name, config, torch.bfloat16, 4096, "nf4", "nf4", experts_per_layer=4)
    got = estimate_plan(plan, Machine())
    rates = simulate(load_trace(MIXTRAL_DECODE), 4, "lru").layer_hit_rates()
    assert all(layer.hit_rate == pytest.approx(sum(rates) / len(rates)) for layer in got.layers)
    assert "borrowed from Mixtral-8x7B" in got.hit_source


def test_machine_settings_are_checked():
    with pytest.raises(SettingError, match="--mem-gbps"):
        Machine(mem_gbps=0)
    with pytest.raises(SettingError, match="device type"):
        Machine("tpu")
    profile = load_profile("rtx-3060-12gb")
    machine = Machine.from_profile(profile, link_gbps=None, disk_gbps=7.0)
    assert (machine.device_type, machine.mem_gbps, machine.link_gbps, machine.disk_gbps) == ("cuda", 360.0, 25.0, 7.0)
    from dataclasses import replace

    with pytest.raises(SettingError, match="machine.mem_gbps"):
        Machine.from_profile(replace(profile, mem_gbps=None))


# ---- offload info -------------------------------------------------------------------------------


def info(*args: str):
    from cli.main import app

    return CliRunner().invoke(app, ["info", *args])


@pytest.mark.parametrize("profile", shipped_profiles())
def test_info_prints_an_estimate_for_each_shipped_profile(profile):
    from offload.demo import DEMO_MODEL_DIR

    result = info(str(DEMO_MODEL_DIR), "--profile", profile)
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("estimate: ") and " tok/s decode" in last
    assert f"memory {load_profile(profile).mem_gbps:g} GB/s" in last


def test_info_estimate_follows_the_flags():
    def estimate(*flags: str) -> dict:
        result = info("mixtral-8x7b", "--vram", "12GiB", "--expert-bits", "4", *flags, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["estimate"]

    base = estimate("--cpu-experts", "off")
    assert base["machine"]["mem_gbps"] == 360 and base["machine"]["link_gbps"] == 25  # the stated defaults
    fast = estimate("--mem-gbps", "720", "--link-gbps", "50", "--cpu-experts", "off")
    overhead = 32 * LAYER_OVERHEAD_S["cuda"]
    assert fast["compute_s"] - overhead == pytest.approx((base["compute_s"] - overhead) / 2)
    assert fast["load_s"] == pytest.approx(base["load_s"] / 2)
    assert base["tokens_per_s"] == pytest.approx(1 / (base["compute_s"] + base["load_s"]))
    assert base["summary"].startswith("estimate: ")
    # the default is the engine's, auto, on the stated RAM (65 GB/s x 0.6); transfer-only beside it
    auto = estimate()
    assert auto["cpu_experts"] == "auto" and auto["machine"]["ram_gbps"] == 65
    # one record read at 65 GB/s x 0.6: --expert-bits 4 is nf4-dq, 3 x (29,360,128 + 917,504 + 3,584 x 4 +
    # 256 x 4 + 16 x 4 + 64) = 90,879,360 bytes a record (nf4's was 99,090,624)
    assert auto["cpu_expert_s"] == pytest.approx(3 * (29_360_128 + 917_504 + 3_584 * 4 + 256 * 4 + 16 * 4 + 64)
                                                 / (65e9 * 0.6))
    assert auto["transfer_tokens_per_s"] == pytest.approx(base["tokens_per_s"])
    assert auto["tokens_per_s"] == pytest.approx(1 / auto["seconds_per_token"]) and auto["tokens_per_s"] > base["tokens_per_s"]
    faster = estimate("--ram-gbps", "130")
    assert faster["cpu_expert_s"] == pytest.approx(auto["cpu_expert_s"] / 2)
    assert faster["tokens_per_s"] > auto["tokens_per_s"]
    assert estimate("--cpu-experts", "all")["cpu_runs_per_token"] == pytest.approx(64.0)  # 32 layers x top-2
    bad = info("mixtral-8x7b", "--vram", "12GiB", "--cpu-experts", "sometimes")
    assert bad.exit_code == 2 and "--cpu-experts" in bad.output


def test_a_profile_says_where_misses_run(tmp_path):
    shipped = info("mixtral-8x7b", "--profile", "rtx-3060-12gb", "--json")
    assert json.loads(shipped.stdout)["estimate"]["cpu_experts"] == "auto"  # the profile's plan.cpu_experts
    text = open(load_profile("rtx-3060-12gb").source).read()
    off = tmp_path / "off.toml"
    off.write_text(text.replace('cpu_experts = "auto"', 'cpu_experts = "off"'))
    got = json.loads(info("mixtral-8x7b", "--profile", str(off), "--json").stdout)["estimate"]
    assert got["cpu_experts"] == "off" and got["tokens_per_s"] == pytest.approx(got["transfer_tokens_per_s"])
    flag = json.loads(info("mixtral-8x7b", "--profile", str(off), "--cpu-experts", "all", "--json").stdout)
    assert flag["estimate"]["cpu_experts"] == "all"  # the flag wins


def test_an_old_card_profile_without_ram_bandwidth_is_estimated_transfer_only(tmp_path):
    text = open(load_profile("rtx-3060-12gb").source).read()
    old = tmp_path / "old.toml"
    old.write_text("\n".join(line for line in text.splitlines()
                             if not line.startswith(("ram_gbps", "cpu_experts"))) + "\n")
    result = info("mixtral-8x7b", "--profile", str(old), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["estimate"]["cpu_experts"] == "off"
    assert "machine.ram_gbps" in result.stderr and "transfer-only" in result.stderr
    given = json.loads(info("mixtral-8x7b", "--profile", str(old), "--ram-gbps", "65", "--json").stdout)
    assert given["estimate"]["cpu_experts"] == "auto"


def test_a_profile_without_bandwidth_gets_a_note_not_an_estimate(tmp_path):
    from offload.demo import DEMO_MODEL_DIR

    path = tmp_path / "old.toml"
    text = (load_profile("rtx-3060-12gb").source and open(load_profile("rtx-3060-12gb").source).read())
    path.write_text("\n".join(line for line in text.splitlines() if not line.startswith("mem_gbps")) + "\n")
    result = info(str(DEMO_MODEL_DIR), "--profile", str(path))
    assert result.exit_code == 0, result.output
    assert "estimate" not in result.stdout and "machine.mem_gbps" in result.stderr
    given = info(str(DEMO_MODEL_DIR), "--profile", str(path), "--mem-gbps", "100")
    assert given.stdout.strip().splitlines()[-1].startswith("estimate: ")


# ---- the KV cache read by a decode step (issue 17) ----------------------------------------------


def test_the_kv_read_by_hand_at_16_and_8_bits():
    """16 bits: the kernel reads Dh values a head and position. 8 bits, as KVCache.read_step runs
    it on CUDA: the int8 codes read (1 byte) with the row's scale and the product written (s) in
    one pass, the product read by SDPA (s): 1 + 2 s a value. On a CPU the cast is a temporary of
    its own (s written, s read): 1 + 4 s."""
    from offload.estimate import kv_read_bytes

    assert kv_read_bytes(TINY, torch.float32, 10) == 2 * 2 * 16 * 10 * 4  # K and V, 2 heads of 16
    assert kv_read_bytes(TINY, torch.float32, 10, 8) == 2 * 2 * 10 * (16 * (1 + 2 * 4) + 4)
    assert kv_read_bytes(TINY, torch.bfloat16, 10, 8) == 2 * 2 * 10 * (16 * 5 + 2)
    assert kv_read_bytes(TINY, torch.bfloat16, 10, 8, device_type="cpu") == 2 * 2 * 10 * (16 * 9 + 2)
    mixtral = builtin_model("mixtral-8x7b")[1]
    sixteen, eight = (kv_read_bytes(mixtral, torch.bfloat16, 32768, bits) for bits in (16, 8))
    assert 32 * sixteen == 4 * 2**30  # the whole bf16 cache, each token
    assert eight / sixteen == pytest.approx((128 * 5 + 2) / (128 * 2))  # 2.5 times: memory saved, not bandwidth
    windowed = ModelConfig.from_dict(dict(TINY_CONFIG, sliding_window=8), source="test")
    assert kv_read_bytes(windowed, torch.float32, 5) == kv_read_bytes(TINY, torch.float32, 5)  # inside the window
    assert kv_read_bytes(windowed, torch.float32, 100, chunk=16) == kv_read_bytes(TINY, torch.float32, 8 + 16)  # ring
    assert kv_read_bytes(windowed, torch.float32, 20, chunk=16) == kv_read_bytes(TINY, torch.float32, 8)


def test_the_estimate_reads_the_kv_cache_at_the_plans_width():
    plan = tiny_plan(experts_per_layer=2, ram=6 * 98_304)
    eight = tiny_plan(experts_per_layer=2, ram=6 * 98_304, kv_bits=8)
    assert eight.kv_bits == 8 and eight.kv_cache_bytes == 2 * 2 * 2 * 64 * (16 + 4) < plan.kv_cache_bytes
    kwargs = dict(dtype=torch.float32, expert_format="fp32", attn_format="fp32", position=10)
    sixteen_s = estimate_decode(TINY, plan, MACHINE, **kwargs)
    eight_s = estimate_decode(TINY, eight, MACHINE, **kwargs)
    # per layer, by hand: on a card 1 + 2 s bytes a value at 8 bits (s = 4 in fp32), s at 16
    extra = (2 * 2 * 10 * (16 * (1 + 2 * 4) + 4) - 2 * 2 * 16 * 10 * 4) / (1e9 * 0.5)
    assert eight_s.kv_bits == 8 and eight_s.kv_s - sixteen_s.kv_s == pytest.approx(extra)
    assert eight_s.seconds_per_token - sixteen_s.seconds_per_token == pytest.approx(2 * extra)
    assert estimate_decode(TINY, eight, MACHINE, kv_bits=16, **kwargs).kv_s == sixteen_s.kv_s
    assert eight_s.to_dict()["kv_bits"] == 8
