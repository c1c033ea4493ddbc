"""The hybrid placement cost model (offload.experts.placement) on stated costs: every expected
choice and finish time below is worked out by hand from the module's model."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from offload.errors import SettingError
from offload.experts.placement import (
    CPU,
    GPU,
    GPU_KERNEL_EFFICIENCY,
    ROUND_TRIP_S,
    Costs,
    Miss,
    Queues,
    engine_placer,
    place,
    place_layer,
    timing,
)

# Costs in seconds, chosen so that the sums are exact in binary or far from ties.
FAST_LINK = Costs(link_s=1.0, gpu_s=0.5, cpu_s=10.0, round_trip_s=0.25)
SLOW_LINK = Costs(link_s=10.0, gpu_s=0.5, cpu_s=1.0, round_trip_s=0.25)
# a 12 GB desktop's shape: a copy 4 ms, the GPU 0.5 ms, the CPU 2.5 ms, 0.125 ms round trip
MIXED = Costs(link_s=4.0, gpu_s=0.5, cpu_s=2.5, round_trip_s=0.125, disk_s=3.0)


def test_a_fast_link_and_a_slow_cpu_send_everything_to_the_gpu():
    # gpu, gpu: copies end at 1 and 2; the GPU computes at 1..1.5 and 2..2.5 -> 2.5
    # gpu, cpu: the GPU 1.5, the CPU 10 + 0.25 -> 10.25; cpu, cpu: 20.25
    got = place_layer([3, 5], FAST_LINK)
    assert got.sides == (GPU, GPU) and got.finish_s == 2.5
    assert got.copy_done_s == (1.0, 2.0) and got.link_free_s == 2.0 and got.cpu_done_s == 0.0


def test_a_slow_link_and_a_fast_cpu_send_everything_to_the_cpu():
    # cpu, cpu: 1 + 1 + 0.25 = 2.25; gpu, cpu: the copy alone ends at 10 -> 10.5
    got = place_layer([3, 5], SLOW_LINK)
    assert got.sides == (CPU, CPU) and got.finish_s == 2.25 and got.cpu_free_s == 2.0
    assert got.link_free_s == 0.0 and got.copy_done_s == (None, None)


def test_the_mixed_case_splits_and_one_miss_goes_to_the_cpu():
    # two misses: gpu, gpu 4.5 then 8.5 -> 8.5; one each: max(4.5, 2.625) = 4.5; cpu, cpu: 5.125
    got = place_layer([1, 6], MIXED)
    assert got.sides == (GPU, CPU) and got.finish_s == 4.5  # the first in the given order to the GPU
    assert got.gpu_done_s == 4.5 and got.cpu_done_s == 2.625
    # one miss: the GPU 4.5, the CPU 2.625
    assert place([2], MIXED) == [CPU]
    assert place([], MIXED) == []


def test_queue_state_shifts_the_choices():
    # CPU work already queued (3 s): the CPU side ends at 3 + 2.5 + 0.125 = 5.625 > 4.5 -> gpu
    assert place([2], MIXED, Queues(cpu_s=3.0)) == [GPU]
    # a link backlog of 2 s: gpu, gpu 10.5; gpu, cpu max(6.5, 2.625) = 6.5; cpu, cpu 5.125
    assert place([1, 6], MIXED, Queues(link_s=2.0)) == [CPU, CPU]
    # a GPU busy with the layer's resident experts: link 0.5, GPU 0.5, CPU 1.5, no round trip
    costs = Costs(link_s=0.5, gpu_s=0.5, cpu_s=1.5, round_trip_s=0.0)
    assert place([4], costs) == [GPU]  # 1.0 against 1.5
    assert place([4], costs, Queues(gpu_s=2.0)) == [CPU]  # max(2, 1.5) = 2 against 2 + 0.5


def test_a_miss_on_disk_is_read_first_whichever_side_runs_it():
    # in RAM: gpu 4.5, cpu 2.625. On disk (3 s): gpu 3 + 4 + 0.5 = 7.5, cpu 3 + 2.5 + 0.125 = 5.625
    got = place_layer([Miss(7, in_ram=False)], MIXED)
    assert got.sides == (CPU,) and got.finish_s == 5.625 and got.ready_s == (3.0,) and got.disk_free_s == 3.0
    forced = place_layer([Miss(7, in_ram=False)], MIXED, mode="off")
    assert forced.finish_s == 7.5 and forced.copy_done_s == (7.0,)
    # a disk backlog of 1 s and two disk misses sent to the GPU: reads end at 4 and 7, copies at
    # 8 and 12, the GPU at 8.5 and 12.5
    both = timing([Miss(1, False), Miss(2, False)], [GPU, GPU], MIXED, Queues(disk_s=1.0))
    assert both.ready_s == (4.0, 7.0) and both.copy_done_s == (8.0, 12.0) and both.finish_s == 12.5
    # one in RAM, one on disk: the RAM miss copies at once (4), the disk one is read by 3 and
    # runs on the CPU by 5.625; the other split (disk to the GPU: 3 + 4 + 0.5 = 7.5) is worse
    mixed = place_layer([Miss(1, True), Miss(2, False)], MIXED)
    assert mixed.sides == (GPU, CPU) and mixed.finish_s == 5.625


def test_ties_go_to_fewer_cpu_experts_and_choices_are_deterministic():
    # one miss: gpu 1 + 1 = 2, cpu 1.75 + 0.25 = 2: a tie, to the GPU
    tie = Costs(link_s=1.0, gpu_s=1.0, cpu_s=1.75, round_trip_s=0.25)
    assert place([0], tie) == [GPU]
    # two misses, identical costs: the split is by count, the first in the given order to the GPU
    assert place([5, 2], MIXED) == [GPU, CPU] and place([2, 5], MIXED) == [GPU, CPU]
    assert all(place([1, 6], MIXED) == [GPU, CPU] for _ in range(5))


def test_a_miss_already_on_the_link_is_waited_for_or_run_on_the_cpu():
    # its copy lands at 1: the GPU at 1 + 0.5 = 1.5 against the CPU's 2.625 -> wait for it
    assert place([Miss(3, lands_s=1.0)], MIXED) == [GPU]
    # lands at 3: 3.5 against 2.625 -> the CPU
    assert place([Miss(3, lands_s=3.0)], MIXED) == [CPU]
    # waiting takes no link time: beside it, a new miss copies at once (4), computes after the
    # landed one: the GPU 1..1.5, then 4..4.5
    both = timing([Miss(3, lands_s=1.0), Miss(5)], [GPU, GPU], MIXED)
    assert both.copy_done_s == (1.0, 4.0) and both.finish_s == 4.5 and both.link_free_s == 4.0
    with pytest.raises(SettingError, match="lands_s"):
        Miss(1, lands_s=-1.0)


def test_many_misses_are_split_by_kind():
    # 12 misses in RAM (more than the exact search's 10): g to the GPU end at 4g + 0.5, the rest
    # on the CPU at 2.5 (12 - g) + 0.125: g = 4 gives max(16.5, 20.125), the least
    got = place_layer(list(range(12)), MIXED)
    assert got.sides == (GPU,) * 4 + (CPU,) * 8 and got.finish_s == 20.125


def test_modes_off_and_all_ignore_the_costs():
    assert place([1, 2], SLOW_LINK, mode="off") == [GPU, GPU]
    assert place([1, 2], FAST_LINK, mode="all") == [CPU, CPU]
    # all on the CPU: 2 x 10 + 0.25
    assert place_layer([1, 2], FAST_LINK, mode="all").finish_s == 20.25
    with pytest.raises(SettingError, match="--cpu-experts"):
        place([1], MIXED, mode="sometimes")


def test_a_batch_scales_the_expert_by_its_compute():
    costs = Costs(link_s=4.0, gpu_s=0.5, cpu_s=2.5, gpu_token_s=0.01, cpu_token_s=1.0)
    assert costs.for_tokens(1) == costs  # memory-bound at batch 1
    at16 = costs.for_tokens(16)
    assert at16.cpu_s == 16.0 and at16.gpu_s == 0.5  # the CPU is compute-bound at 16 tokens
    assert place([1], costs) == [CPU] and place([1], at16) == [GPU]


def test_costs_from_bandwidths_and_a_profile():
    record = 99_090_432  # one nf4 Mixtral-8x7B expert, 94.5 MiB
    got = Costs.from_bandwidths(record, link_gbps=25, gpu_gbps=360, cpu_gbps=65, disk_gbps=3.5)
    assert got.link_s == pytest.approx(record / 25e9)
    assert got.gpu_s == pytest.approx(record / (360e9 * 0.6))
    assert got.cpu_s == pytest.approx(record / (65e9 * 0.6))
    assert got.disk_s == pytest.approx(record / 3.5e9) and got.round_trip_s == ROUND_TRIP_S
    measured = Costs.from_bandwidths(record, link_gbps=25, gpu_s=1e-3, cpu_s=2e-3)
    assert (measured.gpu_s, measured.cpu_s, measured.disk_s) == (1e-3, 2e-3, 0.0)

    @dataclass
    class FakeProfile:  # the Profile fields from_profile reads
        h2d_gbps: float = 25.0
        disk_gbps: float = 3.5
        mem_gbps: float | None = 360.0
        ram_gbps: float | None = 65.0
        cpu_expert_gbps: float | None = None
        gpu_expert_gbps: float | None = None
        round_trip_ms: float | None = None
        source: str = "fake.toml"

    assert Costs.from_profile(FakeProfile(), record) == got
    timed = Costs.from_profile(FakeProfile(cpu_expert_gbps=20.0, gpu_expert_gbps=250.0, round_trip_ms=0.5), record)
    assert timed.cpu_s == pytest.approx(record / 20e9) and timed.gpu_s == pytest.approx(record / 250e9)
    assert timed.round_trip_s == pytest.approx(5e-4)
    measured_cpu_only = Costs.from_profile(FakeProfile(ram_gbps=None, cpu_expert_gbps=20.0), record)
    assert measured_cpu_only.cpu_s == pytest.approx(record / 20e9)  # a measured kernel needs no RAM figure
    with pytest.raises(SettingError, match="fake.toml: machine.ram_gbps"):
        Costs.from_profile(FakeProfile(ram_gbps=None), record)
    with pytest.raises(SettingError, match="link_s"):
        Costs(link_s=-1.0, gpu_s=1.0, cpu_s=1.0)
    with pytest.raises(SettingError, match="gpu_s"):
        Queues(gpu_s=float("inf"))


def test_the_gpu_share_is_the_estimates():
    from offload.estimate import MEMORY_EFFICIENCY

    assert GPU_KERNEL_EFFICIENCY == MEMORY_EFFICIENCY


def test_the_engine_placer_returns_the_experts_to_run_on_the_cpu():
    @dataclass
    class Layout:
        nbytes: int

    @dataclass
    class Config:
        num_experts_per_tok: int = 2

    class Cache:  # ExpertCache's answer to "may a prefetch copy still be running?"
        def __init__(self, running=()):
            self.running = list(running)

        def prefetch_in_flight(self):
            return bool(self.running)

    placer = engine_placer("cuda", Layout(1), Config(), costs=MIXED)
    # one miss, the other expert a hit: the GPU busy 0.5; gpu max(0.5, 4) + 0.5 = 4.5, cpu 2.625
    assert placer(0, [3], Cache()) == [3]
    # two misses: one each (the second to the CPU)
    assert placer(0, [3, 6], Cache()) == [6]
    # a prefetch in flight puts half a copy (2 s) ahead of demand copies: both to the CPU (5.125
    # against max(6.5, 2.625))
    assert placer(0, [3, 6], Cache(running=["h"])) == [3, 6]
    assert placer(0, [3, 6], Cache(running=[])) == [6]  # finished handles do not count
    # a prefill chunk (more misses than top-k): all on the device, unless told its tokens
    assert placer(0, [0, 1, 2], Cache()) == []
    assert placer(0, [0, 1, 2], Cache(), tokens=1) == [1, 2]  # 8.5 + 0 vs (4.5, 5.125): gpu, cpu, cpu


def test_the_cost_model_imports_no_torch():
    import subprocess

    code = "import sys, offload.experts.placement; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
