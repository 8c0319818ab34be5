"""Reserved CPU cores: the config (`cpu_cores`), each replica's slice, moving a process off them, `helix serve`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from helix_serve.cli import main
from helix_serve.serving.app_config import DEFAULT_POOL, HelixAppArgs
from helix_serve.serving.cpu_affinity import replica_cores
from helix_serve.serving.launch import reserved_cores

ROOT = Path(__file__).resolve().parents[1]


def test_replicas_of_a_pool_on_one_node_take_successive_slices():
    assert replica_cores([0, 1, 2, 3], local_rank=0, threads=2) == [0, 1]
    assert replica_cores([0, 1, 2, 3], local_rank=1, threads=2) == [2, 3]
    assert replica_cores([0, 1, 2, 3], local_rank=2, threads=2) == [0, 1]  # more replicas than slices: wrap
    assert replica_cores([4, 6], local_rank=1, threads=1) == [6]
    assert replica_cores([0], local_rank=3, threads=2) == [0]  # fewer cores than threads: all of them


def test_top_level_cpu_cores_go_to_the_default_pool_and_every_pools_cores_are_reserved():
    args = HelixAppArgs(cpu_cores=[0])
    [deployment] = args.engine_deployments()
    assert (deployment.name, deployment.pool.cpu_cores) == (DEFAULT_POOL, [0])
    assert args.reserved_cores() == [0]
    assert HelixAppArgs().reserved_cores() == []
    several = HelixAppArgs(models={
        "a": {"pools": {"A1": {"device": "cpu", "cpu_cores": [2, 3]}, "A2": {"device": "cpu"}}},
        "b": {"cpu_cores": [1, 2]},
    })
    assert several.reserved_cores() == [1, 2, 3]


@pytest.mark.parametrize("settings, needle", [
    ({"cpu_cores": [0, 0]}, "named twice"),
    ({"cpu_cores": [-1]}, "greater than or equal to 0"),
    ({"cpu_cores": []}, "at least 1 item"),
    ({"cpu_cores": [0], "pools": {"P": {"device": "cpu"}}}, "set `cpu_cores` on each pool"),
])
def test_bad_cpu_cores_are_refused(settings, needle):
    with pytest.raises(ValidationError, match=needle):
        HelixAppArgs(**settings)


def test_keep_off_moves_every_thread_and_the_threads_started_later():
    # In a child process: this one's affinity must not change under the rest of the suite.
    script = textwrap.dedent("""
        import os, threading, json
        from helix_serve.serving.cpu_affinity import keep_off
        allowed = os.sched_getaffinity(0)
        reserved = min(allowed)
        stop = threading.Event()
        before = threading.Thread(target=stop.wait)
        before.start()
        others = keep_off([reserved])
        later = {}
        after = threading.Thread(target=lambda: later.update(cores=sorted(os.sched_getaffinity(0))))
        after.start(); after.join()
        tasks = {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
        stop.set(); before.join()
        print(json.dumps({"allowed": sorted(allowed), "reserved": reserved, "others": sorted(others or []),
                          "none": others is None, "tasks": list(tasks.values()), "later": later["cores"]}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                                    cwd=ROOT).stdout)
    if len(out["allowed"]) == 1:  # nothing else to move to: left as it was
        assert out["none"] and out["later"] == out["allowed"]
        return
    expected = sorted(set(out["allowed"]) - {out["reserved"]})
    assert out["others"] == expected
    assert len(out["tasks"]) >= 2 and all(cores == expected for cores in out["tasks"])
    assert out["later"] == expected


def test_a_process_kept_off_a_core_can_move_back_onto_it():
    # `helix serve` keeps the cluster off the reserved cores; an engine replica started in it then moves onto them.
    script = textwrap.dedent("""
        import os, json
        from helix_serve.serving.cpu_affinity import keep_off, move_process
        allowed = sorted(os.sched_getaffinity(0))
        kept_off = keep_off([allowed[0]])
        move_process([allowed[0]])
        print(json.dumps({"allowed": allowed, "kept_off": sorted(kept_off or []),
                          "back": sorted(os.sched_getaffinity(0))}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                                    cwd=ROOT).stdout)
    if len(out["allowed"]) > 1:
        assert out["allowed"][0] not in out["kept_off"]
    assert out["back"] == [out["allowed"][0]]


def test_a_replica_refuses_a_core_its_node_does_not_have():
    from helix_serve.serving.app_config import PoolConfig
    from helix_serve.serving.engine_deployment import pin_replica

    with pytest.raises(ValueError, match=r"cpu_cores \[4095\] do not exist on this node"):
        pin_replica("P", PoolConfig(device="cpu", cpu_cores=[0, 4095]), threads=1)
    assert pin_replica("P", PoolConfig(device="cpu"), threads=1) is None


def test_helix_serve_reads_the_reserved_cores_of_a_config(tmp_path: Path):
    assert reserved_cores(ROOT / "serve_config.yaml") == [0]  # the shipped single-machine config reserves core 0
    config = tmp_path / "pinned.yaml"
    config.write_text(textwrap.dedent("""
        applications:
          - name: other
            import_path: some.other:app
            args: {cpu_cores: [7]}
          - name: helix
            import_path: helix_serve.serving.app:build_app
            args: {device: cpu, cpu_cores: [1]}
    """))
    assert reserved_cores(config) == [1]


@pytest.mark.parametrize("text, needle", [
    ("applications: [{import_path: 'helix_serve.serving.app:build_app', args: {cpu_cores: [0, 0]}}]",
     "named twice"),
    ("applications: [", "expected"),
    ("- just a list", "not a Serve config file"),
    ("applications: [not-a-mapping]", "not a Serve config file"),
])
def test_helix_serve_refuses_a_bad_config_before_starting_anything(tmp_path: Path, text: str, needle: str, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["serve", str(config)]) == 2  # never reaches `serve run`
    err = capsys.readouterr().err
    assert err.startswith("helix: error:") and needle in err


def test_helix_serve_names_a_missing_config_file(tmp_path: Path, capsys):
    assert main(["serve", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err
