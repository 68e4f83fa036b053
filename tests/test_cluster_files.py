"""The files under cluster/ are valid for the tools that read them, and agree with each other
and with pyproject.toml. Fast, no network, no cluster:

- cluster/rayjob.yaml against the KubeRay RayJob v1 CRD schema (vendored in tests/data/, see
  its README), in the strict mode of `kubectl apply` (unknown fields are errors);
- cluster/ray-up.yaml against the schema file Ray 2.60 ships (ray/autoscaler/ray-schema.json),
  and through the config preparation and validation `ray up` runs before it calls the cloud;
- cluster/runtime_env.yaml through ray.runtime_env.RuntimeEnv, with pyproject.toml's pins;
- cluster/gpu.yaml through raylens.config.load_config.

What no test here can show: that a real Kubernetes cluster or AWS account runs them (image
pulls, secrets, quotas, the IAM pass-role) and the image build (cluster/Dockerfile).
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRD_SCHEMA = ROOT / "tests" / "data" / "kuberay_rayjob_v1_schema.json"
IMAGE_ROOT = "/home/ray/raylens/"  # where cluster/Dockerfile puts the repository
GIB = 2**30
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|KEY|PASSWORD)(_|$)")  # HF_TOKEN, not TOKENIZERS_...


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def ray_pin() -> str:
    """The Ray version of pyproject.toml's `ray` extra (e.g. "2.60.0")."""
    (req,) = pyproject()["optional-dependencies"]["ray"]
    return req.split("==")[1]


def quantity(q: str | int) -> float:
    """A Kubernetes resource quantity in base units (bytes for memory)."""
    m = re.fullmatch(r"([0-9.]+)([KMGTPE]i?)?", str(q))
    assert m, q
    powers = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(m.group(1)) * powers[m.group(2) or ""]


# ---------------------------------------------------------------------------- KubeRay RayJob


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected, as `kubectl apply` does (field validation
    "Strict", its default): every object schema that lists its properties and does not keep
    unknown fields gets ``additionalProperties: false``."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def rayjob_validator():
    schema = strict(json.loads(CRD_SCHEMA.read_text()))
    # OpenAPI v3 schemas are Draft 4 JSON Schema plus `x-kubernetes-*` extensions (ignored here,
    # as are the few CEL rules, none of which concern fields rayjob.yaml sets).
    return jsonschema.Draft4Validator(schema)


def errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def pods(job: dict) -> dict[str, dict]:
    spec = job["spec"]["rayClusterSpec"]
    out = {"head": spec["headGroupSpec"]["template"]["spec"]}
    out.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return out


def test_rayjob_matches_the_kuberay_crd_schema(rayjob_validator):
    job = load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert errors(rayjob_validator, job) == []


def test_the_crd_schema_rejects_broken_rayjobs(rayjob_validator):
    job = load("rayjob.yaml")
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    assert any("replicas" in e and "integer" in e for e in errors(rayjob_validator, broken))
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish'" in e for e in errors(rayjob_validator, typo))
    bad_memory = copy.deepcopy(job)
    pods(bad_memory)["gpu"]["containers"][0]["resources"]["limits"]["memory"] = "112 GB"
    assert errors(rayjob_validator, bad_memory)
    no_key = copy.deepcopy(job)
    del pods(no_key)["head"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["key"]
    assert any("'key' is a required property" in e for e in errors(rayjob_validator, no_key))


def test_rayjob_runs_as_written():
    job = load("rayjob.yaml")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["rayClusterSpec"]["rayVersion"] == ray_pin()
    # The code and its dependencies are in the image, so the runtime env ships neither (no
    # placeholder working_dir), and it is a valid Ray runtime_env.
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    assert not {"working_dir", "pip", "uv", "conda", "py_modules"} & set(env)
    # The entrypoint's config is a file of this repository, baked in at IMAGE_ROOT.
    config = re.search(r"--config (\S+)", spec["entrypoint"]).group(1)
    assert config.startswith(IMAGE_ROOT) and (ROOT / config.removeprefix(IMAGE_ROOT)).is_file()

    # One image, built from cluster/Dockerfile, whose base is the pinned Ray.
    images = {c["image"] for p in pods(job).values() for c in p["containers"]}
    assert len(images) == 1
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_pin())}-py311-gpu$", dockerfile, re.M)
    assert "['optional-dependencies']['ray']" in dockerfile and "p['dependencies']" in dockerfile
    assert ".venv" in (CLUSTER / "Dockerfile.dockerignore").read_text().split()

    for name, pod in pods(job).items():
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        for var in ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"] and not ref.get("optional"), (name, var)
        assert not any("value" in e and SECRET_NAME.search(e["name"]) for e in env.values())
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert set(mounts.values()) <= set(volumes), name
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    head = pods(job)["head"]
    (head_container,) = head["containers"]
    corpus = {m["mountPath"]: m["name"] for m in head_container["volumeMounts"]}["/data"]
    assert {v["name"]: v for v in head["volumes"]}[corpus]["persistentVolumeClaim"]["claimName"]


def test_rayjob_gpu_workers_fit_the_job_they_run():
    """The sizes in rayjob.yaml cover cluster/gpu.yaml: one pod per model worker, one GPU each,
    and host memory for the measured extraction peak (49 GiB per 2,000-document shard at
    d_model 4096, DESIGN.md) + a full 8B model being loaded (15 GiB) + the object store."""
    job, cfg = load("rayjob.yaml"), load("gpu.yaml")
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    res = cfg["resources"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == res["num_workers"]
    (container,) = group["template"]["spec"]["containers"]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits == requests  # Guaranteed QoS: a GPU worker is not the first pod evicted
    assert quantity(limits["nvidia.com/gpu"]) == res["gpus_per_worker"]
    assert quantity(limits["cpu"]) >= res["cpus_per_worker"]
    assert cfg["extraction"]["shard_size"] == 2000  # the shard the 49 GiB was measured at
    object_store = int(group["rayStartParams"]["object-store-memory"])
    assert quantity(limits["memory"]) >= 49 * GIB + 15 * GIB + object_store


# ---------------------------------------------------------------------------- ray up


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_ray_up_matches_rays_autoscaler_schema():
    config = load("ray-up.yaml")
    schema = ray_schema()
    jsonschema.validate(config, schema)
    # The cross-field rules of Ray's validate_config that a schema cannot state.
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    # The validation bites.
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["max_workers"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    typo = copy.deepcopy(config)
    typo["setup_command"] = typo.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)


def test_ray_up_passes_rays_own_config_preparation():
    """What `ray up` does with the file before it talks to AWS: merge the provider's defaults
    (prepare_config), then validate the result (validate_config). Ray's module is private to
    Ray, not to raylens; the public schema test above stands on its own if it moves."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(load("ray-up.yaml"))
    util.validate_config(prepared)
    assert prepared["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1


def test_ray_up_installs_the_pinned_stack_on_the_pinned_ray():
    config = load("ray-up.yaml")
    assert config["docker"]["image"] == f"rayproject/ray:{ray_pin()}-py311-gpu"
    assert config["file_mounts"]["~/raylens"] == "."  # the repository, from its root
    assert any(re.search(r'pip install .*-e "\$HOME/raylens\[ray\]"', c) for c in config["setup_commands"])
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1
    assert gpu["max_workers"] >= load("gpu.yaml")["resources"]["num_workers"]
    assert "IamInstanceProfile" in gpu["node_config"]  # workers write shards to S3
    assert not re.search(r"(?i)hf_[a-z0-9]{20,}|aws_secret_access_key\s*[:=]", (CLUSTER / "ray-up.yaml").read_text())


# ---------------------------------------------------------------------------- runtime_env


def test_runtime_env_is_valid_and_pins_pyproject():
    from ray.runtime_env import RuntimeEnv, RuntimeEnvConfig

    raw = load("runtime_env.yaml")
    env = RuntimeEnv(**raw)
    assert env["pip"]["packages"] == pyproject()["dependencies"]
    # RuntimeEnv only warns about unknown `config` keys and drops them: a typo would silently
    # leave Ray's 600 s setup timeout, too short for the CUDA wheels.
    assert set(raw["config"]) <= RuntimeEnvConfig.known_fields
    assert env["config"]["setup_timeout_seconds"] >= 1800
    assert not [k for k in env.get("env_vars", {}) if SECRET_NAME.search(k)]


# ---------------------------------------------------------------------------- job config


def test_gpu_config_loads():
    try:
        from raylens.config import load_config
    except ImportError as exc:  # the config package is being restructured
        pytest.skip(f"raylens.config.load_config does not import: {exc}")
    cfg = load_config(CLUSTER / "gpu.yaml")
    assert cfg.model.dtype == "bfloat16" and cfg.resources.gpus_per_worker == 1
    assert cfg.output_uri.startswith("s3://")
