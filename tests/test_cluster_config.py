"""ray_cluster.yaml, checked offline the way `ray up` checks it before touching AWS."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG_PATH = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"
GPU_INSTANCE_PREFIXES = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p5.")


@pytest.fixture
def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG_PATH.read_text())


def gpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


def test_valid_for_the_installed_ray(config):
    # `ray up` fills in the provider's defaults and then validates against ray-schema.json.
    validate_config(prepare_config(config))


def test_rejects_a_broken_copy(config):
    broken = copy.deepcopy(config)
    broken["idle_timeout_minuts"] = 5
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minuts"):
        validate_config(prepare_config(broken))
    broken = copy.deepcopy(config)
    del broken["available_node_types"]["gpu"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        validate_config(prepare_config(broken))


def test_gpu_workers_scale_from_zero(config):
    gpus = gpu_types(config)
    assert set(gpus) == {"gpu", "gpu_spot"}
    for node_type in gpus.values():
        assert node_type["resources"]["GPU"] == 1
        assert node_type["node_config"]["InstanceType"].startswith(GPU_INSTANCE_PREFIXES)
        assert node_type["min_workers"] == 0
        assert 0 < node_type["max_workers"] <= config["max_workers"]
        assert node_type["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}


def test_spot_and_on_demand_types(config):
    market = {name: t["node_config"].get("InstanceMarketOptions") for name, t in gpu_types(config).items()}
    assert market == {"gpu": None, "gpu_spot": {"MarketType": "spot"}}


def test_head_does_no_gpu_work(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert not head["node_config"]["InstanceType"].startswith(GPU_INSTANCE_PREFIXES)
    assert head.get("max_workers", 0) == 0


def test_setup_installs_torch_before_the_project(config):
    commands = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if c.startswith("pip install torch"))
    project_at = next(i for i, c in enumerate(commands) if "~/latentstore" in c)
    assert torch_at < project_at
    assert config["file_mounts"]["~/latentstore"] == "."


def test_token_auth_on_every_node(config):
    assert "~/.ray/auth_token" in config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)


def test_docker_ray_matches_the_installed_ray(config):
    import ray

    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
