"""Reserved CPU cores: the config (`cpu_cores`), each replica's slice, moving a process off them, `helix serve`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

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


def test_helix_serve_reads_the_reserved_cores_of_a_config(tmp_path: Path):
    assert reserved_cores(ROOT / "serve_config.yaml") == HelixAppArgs(
        **_yaml_args(ROOT / "serve_config.yaml")).reserved_cores()
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
])
def test_helix_serve_refuses_a_bad_config_before_starting_anything(tmp_path: Path, text: str, needle: str):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    done = subprocess.run([sys.executable, "-m", "helix_serve.cli", "serve", str(config)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("helix: error:") and needle in done.stderr
    assert "Traceback" not in done.stderr


def test_helix_serve_names_a_missing_config_file(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "helix_serve.cli", "serve", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "none.yaml" in done.stderr and "Traceback" not in done.stderr


def _yaml_args(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["applications"][0]["args"]

