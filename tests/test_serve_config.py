"""The shipped Serve YAML files are valid Ray Serve deploy configs with valid Helix args and pools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray._common.ray_option_utils import validate_actor_options
from ray.serve.schema import ServeDeploySchema

from helix_serve.serving.app import build_app
from helix_serve.serving.app_config import DEFAULT_POOL, INGRESS_NAME, BatchingConfig, HelixAppArgs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "serve_config.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


def _app(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())["applications"][0]


def _deployment(path: Path, name: str) -> dict[str, Any]:
    return next(d for d in _app(path)["deployments"] if d["name"] == name)


def test_every_variant_is_checked():
    assert {p.name for p in CONFIGS} == {"serve_config.yaml", "cpu.yaml", "cuda.yaml", "directml.yaml",
                                         "mixed-cluster.yaml", "multi-model.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_serve_deploy_config(path: Path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = schema.applications
    assert app.import_path == "helix_serve.serving.app:build_app"
    args = HelixAppArgs(**app.args)
    deployments = {d.name: d for d in app.deployments}
    # Serve refuses a YAML entry for a deployment the builder did not bind, so names must match the pools.
    assert set(deployments) == {INGRESS_NAME, *(d.name for d in args.engine_deployments())}
    for d in args.engine_deployments():
        engine = deployments[d.name]
        batching = BatchingConfig(**engine.user_config)
        assert engine.max_ongoing_requests >= max(batching.max_batch_size, d.model_args.max_num_seqs)
    assert deployments[INGRESS_NAME].ray_actor_options.num_cpus < 1  # fractional: fits 2-core machines


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_actor_options_are_valid_actor_options(path: Path):
    # ServeDeploySchema lets unknown keys through here; only a deploy would catch a typo.
    for deployment in _app(path)["deployments"]:
        validate_actor_options(deployment["ray_actor_options"], in_options=False)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_builder_binds_one_engine_deployment_per_pool_of_each_model(path: Path):
    args = _app(path)["args"]
    ingress = build_app(args)._bound_deployment
    engines = ingress.init_args[0]  # served model → {deployment name: bound engine}
    assert ingress.name == INGRESS_NAME
    bound = {(model, name, app._bound_deployment.name) for model, pools in engines.items()
             for name, app in pools.items()}
    assert bound == {(d.model, d.name, d.name) for d in HelixAppArgs(**args).engine_deployments()}


def test_single_pool_variants_keep_the_helix_engine_deployment():
    cuda = _app(ROOT / "configs" / "cuda.yaml")
    assert (cuda["args"]["device"], cuda["args"]["dtype"]) == ("cuda", "bfloat16")
    assert _deployment(ROOT / "configs" / "cuda.yaml", DEFAULT_POOL)["ray_actor_options"]["num_gpus"] == 1
    for path in (ROOT / "serve_config.yaml", ROOT / "configs" / "cpu.yaml"):
        assert "pools" not in _app(path)["args"] and _app(path)["args"]["device"] == "cpu"


def test_directml_pools_need_a_directml_node_and_do_not_silently_run_on_cpu():
    for path in (ROOT / "configs" / "directml.yaml", ROOT / "configs" / "mixed-cluster.yaml"):
        pool = HelixAppArgs(**_app(path)["args"]).engine_pools()["engine_directml"]
        assert (pool.device, pool.fallback) == ("directml", None)
        options = _deployment(path, "engine_directml")["ray_actor_options"]
        assert options["resources"] == {"directml": 1} and options["label_selector"] == {"accel": "directml"}


def test_mixed_cluster_pins_each_pool_to_its_kind_of_node():
    path = ROOT / "configs" / "mixed-cluster.yaml"
    pools = HelixAppArgs(**_app(path)["args"]).engine_pools()
    assert {name: pool.device for name, pool in pools.items()} == \
        {"engine_cuda": "cuda", "engine_directml": "directml", "engine_cpu": "cpu"}
    assert pools["engine_cuda"].capacity > pools["engine_directml"].capacity > pools["engine_cpu"].capacity
    assert _deployment(path, "engine_cuda")["ray_actor_options"]["num_gpus"] == 1
    # Without a selector the CPU pool would also spread onto the GPU and DirectML nodes.
    assert _deployment(path, "engine_cpu")["ray_actor_options"]["label_selector"] == {"accel": "cpu"}


def test_speculation_args_reach_the_engine_config():
    config = HelixAppArgs(speculative_method="ngram", prompt_lookup_min=2, prompt_lookup_max=4, k_max=6).engine_config()
    assert (config.speculative_method, config.prompt_lookup_min, config.prompt_lookup_max, config.k_max) == \
        ("ngram", 2, 4, 6)
    with pytest.raises(ValueError, match="speculative_method"):
        HelixAppArgs(speculative_method="medusa")
    assert HelixAppArgs(quantization="int4").engine_config().quantization == "int4"
    assert HelixAppArgs().engine_config().quantization == "auto"


def test_an_eagle_head_replaces_the_default_draft_model():
    config = HelixAppArgs(eagle_head="heads/smollm2-eagle", speculative_method="eagle").engine_config()
    assert (config.eagle_head, config.draft_model, config.speculative_method) == \
        ("heads/smollm2-eagle", None, "eagle")
    with pytest.raises(ValueError, match="not both"):
        HelixAppArgs(eagle_head="heads/smollm2-eagle", draft_model="drafts/smollm2")
    assert HelixAppArgs().engine_config().eagle_head is None


def test_unknown_args_are_refused():
    with pytest.raises(ValueError, match="not_an_arg"):
        HelixAppArgs(not_an_arg=1)


def test_the_multi_model_config_serves_the_draft_pair_and_the_eagle_pair_under_their_own_names():
    args = HelixAppArgs(**_app(ROOT / "configs" / "multi-model.yaml")["args"])
    deployments = {d.model: d for d in args.engine_deployments()}
    assert list(deployments) == ["smollm2-135m-instruct", "smollm2-135m-instruct-eagle"]  # the first is the default
    draft, eagle = deployments.values()
    assert draft.model_args.engine_config().draft_model is not None and draft.model_args.eagle_head is None
    assert eagle.model_args.engine_config().draft_model is None and eagle.model_args.eagle_head is not None
    assert draft.model_args.target_model == eagle.model_args.target_model


def test_models_each_get_their_own_pools_and_deployments():
    args = HelixAppArgs(models={"org/model.v1": {"target_model": "a"},
                                "small": {"target_model": "b", "pools": {"small_cpu": {"device": "cpu"}}}})
    assert [(d.model, d.name) for d in args.engine_deployments()] == \
        [("org/model.v1", "HelixEngine-org-model-v1"), ("small", "small_cpu")]
    assert list(args.served_models()) == ["org/model.v1", "small"]
    assert args.served_models()["small"].engine_config().target_model == "b"
    one = HelixAppArgs(target_model="c", served_model_name="mine")
    assert [(d.model, d.name, d.model_args.target_model) for d in one.engine_deployments()] == \
        [("mine", DEFAULT_POOL, "c")]


@pytest.mark.parametrize(("settings", "needle"), [
    ({"models": {}}, "at least one model"),
    ({"models": {"a": {}}, "target_model": "x"}, "target_model on each model"),
    ({"models": {"a": {}}, "served_model_name": "x"}, "served_model_name on each model"),
    ({"models": {"a": {"pools": {"p": {}}}, "b": {"pools": {"p": {}}}}}, "p used twice"),
    ({"models": {"a": {"pools": {"HelixEngine-b": {}}}, "b": {}}}, "HelixEngine-b used twice"),
    ({"models": {"a": {"served_model_name": "x"}}}, "served_model_name"),
    ({"models": {"a b": {}}}, "pattern"),
    ({"models": {"a": {"eagle_head": "h", "draft_model": "d"}}}, "not both"),
])
def test_bad_model_settings_are_refused(settings, needle):
    with pytest.raises(ValueError, match=needle):
        HelixAppArgs(**settings)


def test_the_ingress_imports_no_torch():
    """The ingress replica never runs a model: without torch it starts in ~1 s instead of ~3 and holds ~150 MB
    instead of ~330 (measured on the tiny pair's app). A new interpreter, as a replica is."""
    code = ("import sys, helix_serve.serving.ingress; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
