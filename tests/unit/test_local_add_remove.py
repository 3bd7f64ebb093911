"""`ernie-mesh add/remove/scale` without processes: where an added engine goes (fake GPU lists, fake
core lists), the running mesh's plan rebuilt from its state file, slot claims, removal order."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.config import ConfigError
from agent.engine.cpu import BIND_VAR, format_core_list, least_used_share, parse_core_list
from agent.local.engines import LocalEngine, removal_order
from agent.local.placement import GPU_VAR, Placement, held_gpus, parse_gpu_list, place
from agent.local.plan import MeshPlan
from agent.local.runstate import AddedEngine, Proc, claim_added, read_added

NVIDIA_SMI_L = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-1b2c)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-3d4e)
GPU 2: NVIDIA A100-SXM4-40GB (UUID: GPU-5f6a)
GPU 3: NVIDIA A100-SXM4-40GB (UUID: GPU-7b8c)
"""


def test_nvidia_smi_list_gives_the_gpu_indices():
    assert parse_gpu_list(NVIDIA_SMI_L) == [0, 1, 2, 3]
    assert parse_gpu_list("No devices were found\n") == []


def test_an_added_engine_takes_the_first_gpu_no_running_engine_holds():
    running = [{GPU_VAR: "0"}, {GPU_VAR: "1"}]
    assert place(running, [0, 1, 2, 3]) == Placement(gpu=2)
    # a tensor-parallel engine holds several; an engine without the variable holds none
    assert held_gpus([{GPU_VAR: "0,2"}, {}]) == {0, 2}
    assert place([{GPU_VAR: "0,2"}, {GPU_VAR: "1"}], [0, 1, 2, 3]) == Placement(gpu=3)


def test_no_free_gpu_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        place([{GPU_VAR: "0"}, {GPU_VAR: "1"}], [0, 1])
    assert "no free GPU" in str(e.value) and "ernie-mesh remove" in str(e.value) and "\n" not in str(e.value)


def test_without_a_gpu_the_engine_gets_the_least_used_cores():
    # 2 cores, two engines on one each: the third shares the first (never all cores at once)
    assert place([{BIND_VAR: "0"}, {BIND_VAR: "1"}], [], cores=[0, 1]) == Placement(cpu_bind="0")
    # 8 cores, one engine on the first half: the other half is free
    assert place([{BIND_VAR: "0-3"}], [], cores=list(range(8))).cpu_bind == "4-7"
    # 8 cores fully shared by two engines: a third of them, the first window on a tie
    assert place([{BIND_VAR: "0-3"}, {BIND_VAR: "4-7"}], [], cores=list(range(8))).cpu_bind == "0-1"
    # 8 cores, engines on 0-3 and 4-5: 6-7 are free
    assert least_used_share([[0, 1, 2, 3], [4, 5]], list(range(8))) == "6-7"
    # an engine without a binding (vLLM's own `auto`) counts as using every core
    assert place([{}, {BIND_VAR: "0-1"}], [], cores=[0, 1, 2, 3]).cpu_bind == "2"
    # the first engine of a mesh: every core
    assert place([], [], cores=[0, 1, 2, 3]).cpu_bind == "0-3"


def test_core_lists_round_trip():
    assert parse_core_list("0-3,5") == [0, 1, 2, 3, 5]
    assert format_core_list([5, 0, 1, 2, 3]) == "0-3,5"
    assert parse_core_list("x") == []


def test_the_added_engine_table_carries_its_placement_and_args():
    plan = MeshPlan(engines=2, vllm_args=("--max-model-len", "4096"), run_dir=Path("/tmp/x"))
    gpu = plan.added_engine_table(8003, "vllm", "/m", "smollm2", Placement(gpu=2))
    assert gpu["env"][GPU_VAR] == "2" and gpu["port"] == 8003 and gpu["args"][-2:] == ["--max-model-len", "4096"]
    cpu = plan.added_engine_table(8003, "vllm", "/m", "other", Placement(cpu_bind="1"), vllm_args=("--seed", "1"))
    assert cpu["env"][BIND_VAR] == "1" and cpu["served_model_name"] == "other" and cpu["args"][-2:] == ["--seed", "1"]
    assert "--max-model-len" in cpu["args"]  # the CPU build's own flags stay; the mesh's extra ones do not
    assert cpu["args"].count("--max-model-len") == 1
    sim = plan.added_engine_table(8004, "simulated", "", "m2", Placement())
    assert sim == {"kind": "simulated", "port": 8004, "served_model_name": "m2", "shutdown_timeout_s": 5.0}


def test_the_plan_is_rebuilt_from_the_state_file_spec():
    plan = MeshPlan(engines=3, engine_kind="simulated", vllm_args=("-x",), port_offset=20000, run_dir=Path("/tmp/y"))
    again = MeshPlan.from_spec(plan.summary()["spec"])
    assert again == plan
    assert again.instance_id_at(again.engine_port(3)) == plan.instance_id(3)


def _record(name: str = "engine-agent-3", **kw) -> AddedEngine:
    fields = dict(
        name=name,
        slot=2,
        instance_id="ernie-n-127.0.0.1-8003",
        engine_kind="simulated",
        model="simulated",
        engine_port=8003,
        agent_port=9203,
        config="/tmp/e.toml",
    )
    fields.update(kw)
    return AddedEngine(**fields)


def test_a_slot_is_claimed_once_and_a_stale_claim_is_replaced(tmp_path):
    assert claim_added(tmp_path, _record())
    assert not claim_added(tmp_path, _record())  # an `add` in progress holds it
    old = _record(added_at=time.time() - 3600)  # left by an `add` that died before starting its agent
    (tmp_path / "added" / "engine-agent-3.json").unlink()
    assert claim_added(tmp_path, old)
    assert claim_added(tmp_path, _record(instance_id="new"))
    assert [r.instance_id for r in read_added(tmp_path)] == ["new"]
    me = Proc("x", os.getpid(), 0)
    assert not _record(pid=me.pid, start_ticks=-5).alive()  # a recycled pid is not our engine agent


def test_scale_removes_added_engines_newest_first_then_ups_own_from_the_last():
    p = Proc("x", 1, 0)

    def engine(slot: int, added_at: float | None) -> LocalEngine:
        rec = _record(f"engine-agent-{slot + 1}", slot=slot, added_at=added_at) if added_at else None
        return LocalEngine(f"engine-agent-{slot + 1}", slot, f"i{slot}", p, Path("/c"), rec)

    engines = [engine(0, None), engine(1, None), engine(2, 100.0), engine(3, 200.0)]
    assert [e.slot for e in removal_order(engines)] == [3, 2, 1, 0]


@pytest.mark.parametrize("command", ["add", "remove", "scale"])
@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_a_timeout_that_is_not_a_positive_number_is_refused_before_anything_starts(command, value, capsys):
    """remove --timeout 0 once SIGKILLed the engine at once, without its drain; add/scale started an
    engine and then failed: refused at the command line now (exit 2, one line)."""
    import importlib

    module = importlib.import_module(f"agent.local.{command}")
    rest = {"add": [], "remove": ["some-instance"], "scale": ["2"]}[command]
    with pytest.raises(SystemExit) as e:
        module.parser().parse_args([*rest, "--timeout", value])
    assert e.value.code == 2
    assert "--timeout" in capsys.readouterr().err
