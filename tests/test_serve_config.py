"""The shipped Serve YAML files are valid Ray Serve deploy configs with valid Helix args."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from helix_serve.serving.app_config import BatchingConfig, HelixAppArgs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "serve_config.yaml", ROOT / "configs" / "cpu.yaml", ROOT / "configs" / "cuda.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_serve_deploy_config(path: Path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = schema.applications
    assert app.import_path == "helix_serve.serving.app:build_app"
    args = HelixAppArgs(**app.args)
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"HelixIngress", "HelixEngine"}
    engine = deployments["HelixEngine"]
    batching = BatchingConfig(**engine.user_config)
    assert engine.max_ongoing_requests >= max(batching.max_batch_size, args.max_num_seqs)
    assert deployments["HelixIngress"].ray_actor_options.num_cpus < 1  # fractional: fits 2-core machines


def test_cpu_and_cuda_variants_pick_their_device():
    cuda = yaml.safe_load((ROOT / "configs" / "cuda.yaml").read_text())["applications"][0]
    engine = next(d for d in cuda["deployments"] if d["name"] == "HelixEngine")
    assert (cuda["args"]["device"], cuda["args"]["dtype"], engine["ray_actor_options"]["num_gpus"]) == \
        ("cuda", "bfloat16", 1)
    for path in CONFIGS[:2]:
        assert yaml.safe_load(path.read_text())["applications"][0]["args"]["device"] == "cpu"


def test_unknown_args_are_refused():
    with pytest.raises(ValueError, match="not_an_arg"):
        HelixAppArgs(not_an_arg=1)
