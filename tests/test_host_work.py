"""Host work per decode step, counted (not timed): aten ops, device-to-host reads, allocations.

On a GPU every aten op is a few microseconds of Python and dispatcher time and every
device-to-host read stalls the host until the device catches up, so a decode step's cost has a
floor of (ops x per-op cost) whatever the cache does. These counts do not depend on timing, so
they are asserted here, on the CPU, with a TorchDispatchMode that sees every aten call: the
limits are the issue's (at most 60 ops per layer with the default policy and the cache on; one
device-to-host read per layer; no tensor created from nothing inside a step).
"""

from __future__ import annotations

import collections
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import offload.model as model_module
from offload.demo import DEMO_MODEL_DIR
from offload.engine import Engine

OPS_PER_LAYER = 60
# ops that make a tensor out of nothing: an allocation a step could have made once, at load
FACTORY_OPS = ("empty", "zeros", "ones", "full", "arange", "scalar_tensor", "lift_fresh", "new_", "rand", "tensor")
# ops a host read shows as on a CPU tensor: tolist (resolve_conj + resolve_neg), item, .cpu()/.to()
HOST_READ = "aten.resolve_conj.default"


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def decode_step_ops(engine: Engine) -> collections.Counter[str]:
    """The aten ops of one decode step, after a prompt and a few warm-up steps."""
    ids = engine.tokenizer.encode("To open a file for reading, use", bos=True)
    token = int(engine.prefill(ids).argmax())
    for _ in range(3):
        token = int(engine.decode(token).argmax())
    counter = OpCounter()
    with counter:
        engine.decode(token)
    return counter.ops


@pytest.fixture(scope="module")
def demo_pack(tmp_path_factory):
    from offload.pack import convert

    return convert(DEMO_MODEL_DIR, tmp_path_factory.mktemp("demo") / "pack")


@pytest.fixture(scope="module", params=["resident", "cache, RAM tier", "cache, pack reads"])
def engine(request, demo_pack):
    """The demo model all resident, and through the cache at 4 of 8 experts per layer (misses
    copied from the RAM tier, or read from a pack), under the default policy."""
    if request.param == "resident":
        engine = Engine.load(DEMO_MODEL_DIR, device="cpu")
    elif request.param == "cache, RAM tier":
        engine = Engine.load(DEMO_MODEL_DIR, device="cpu", experts_per_layer=4)
    else:
        engine = Engine.load(demo_pack, device="cpu", experts_per_layer=4, ram=0)
    yield engine
    engine.close()


def test_a_decode_step_stays_under_the_op_budget(engine):
    ops = decode_step_ops(engine)
    layers = engine.config.num_hidden_layers
    total = sum(ops.values())
    assert total <= OPS_PER_LAYER * layers, f"{total / layers:.1f} ops per layer: {ops.most_common(12)}"


def test_a_decode_step_reads_from_the_device_once_per_layer(engine):
    """One host read per layer: the chosen experts (with the look-ahead's picks in the same
    copy). On a CPU tensor a tolist shows as resolve_conj; .item() and .cpu() show too."""
    layers = engine.config.num_hidden_layers
    reads = []
    real = model_module.to_host
    with mock.patch.object(model_module, "to_host", side_effect=lambda t: reads.append(t.shape) or real(t)):
        ops = decode_step_ops(engine)
    assert len(reads) == 4 * layers  # three warm-up steps and the counted one, one read per layer each
    assert ops["aten.item.default"] == 0 and ops["aten._local_scalar_dense.default"] == 0  # no .item()
    if engine.cache is None or engine.cache.host.capacity:  # (a pack read's numpy view shows as these too)
        assert ops[HOST_READ] == layers  # nothing else in the step reads values to the host
        assert ops["aten.to.dtype_layout"] == 0 and ops["aten.to.device"] == 0  # no .cpu() or .to(device)


def test_a_decode_step_creates_no_tensor_from_nothing(engine):
    ops = decode_step_ops(engine)
    made = {name: n for name, n in ops.items() if name.removeprefix("aten.").startswith(FACTORY_OPS)}
    assert made == {}


def test_the_counter_sees_a_host_read_and_an_allocation():
    """The oracle itself: a tolist, an item and a fresh tensor are each seen."""
    counter = OpCounter()
    t = torch.arange(3)
    with torch.inference_mode(), counter:  # as the model runs
        t.tolist()
        t[0].item()
        torch.zeros(2)
    assert counter.ops[HOST_READ] == 1 and counter.ops["aten.item.default"] == 1
    assert any(name.startswith("aten.zeros") for name in counter.ops)
