"""The cluster manifests (infra/k8s) against the Kubernetes and KubeRay schemas, offline, and
the image's install against the Makefile's.

Built-in kinds are validated strictly (unknown fields fail) by kubernetes-validate, which ships
the Kubernetes OpenAPI schemas; the RayCluster against KubeRay's CRD schema, vendored under
infra/k8s/schemas, made strict the way `kubectl apply --validate=strict` treats a structural
schema (a field the schema does not declare is an error). CEL rules
(x-kubernetes-validations) are the API server's and are not checked here.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import prefect
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
KUBERNETES = "1.33.0"  # the oldest minor the manifests are written for
TEMPLATE = K8S / "work-pool-template.json"


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _strict(schema: dict) -> dict:
    """A structural schema as strict field validation reads it: an object that declares its
    properties takes no others."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


RAY_SCHEMA = _strict(json.loads((K8S / "schemas" / "raycluster.ray.io_v1.json").read_text()))


def validate(doc: dict) -> None:
    if doc["apiVersion"] == "ray.io/v1":
        assert doc["kind"] == "RayCluster", doc["kind"]
        jsonschema.Draft7Validator(RAY_SCHEMA).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize(("name", "doc"), _docs(), ids=lambda v: v if isinstance(v, str) else
                         f"{v['kind']}/{v['metadata']['name']}")
def test_every_manifest_validates_against_its_schema(name, doc):
    validate(doc)
    assert doc["metadata"].get("namespace", "recsqueeze") == "recsqueeze"


def test_the_manifests_are_the_whole_deployment():
    kinds = {d["kind"] for _, d in _docs()}
    assert {"Namespace", "ConfigMap", "Secret", "Service", "StatefulSet", "Deployment",
            "ServiceAccount", "Role", "RoleBinding", "RayCluster"} <= kinds


def test_a_misspelt_or_mistyped_field_fails_validation():
    """The validators are not vacuous: what a typo or a wrong type does to each kind."""
    ray_doc = next(d for _, d in _docs() if d["kind"] == "RayCluster")
    bad = copy.deepcopy(ray_doc)
    group = bad["spec"]["workerGroupSpecs"][0]
    group["rayStartParam"] = group.pop("rayStartParams")
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        validate(bad)
    bad = copy.deepcopy(ray_doc)
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match="eight"):
        validate(bad)
    deployment = copy.deepcopy(next(d for _, d in _docs() if d["kind"] == "Deployment"))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def _group(doc: dict, name: str) -> dict:
    return next(g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == name)


def test_the_ray_cluster_matches_what_the_flow_asks_of_it():
    doc = next(d for _, d in _docs() if d["kind"] == "RayCluster")
    assert doc["spec"]["rayVersion"] == ray.__version__  # driver and workers: one Ray
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    gpu, cpu = _group(doc, "gpu"), _group(doc, "cpu")
    for group in (gpu, cpu):
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert limits["cpu"] == group["rayStartParams"]["num-cpus"]  # Ray sees what k8s gives
    (gpu_container,) = gpu["template"]["spec"]["containers"]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == \
        gpu["rayStartParams"]["num-gpus"] == "1"
    assert gpu_container["image"].endswith(":cuda")
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    pods = [doc["spec"]["headGroupSpec"]["template"], gpu["template"], cpu["template"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
            assert refs == {"recsqueeze-settings", "recsqueeze-s3"}, container["name"]
            assert "env" not in container or not any(
                "KEY" in e["name"] for e in container["env"])  # secrets only from the Secret


def test_secrets_in_the_repository_are_placeholders_only():
    for name, doc in _docs():
        if doc["kind"] == "Secret":
            assert "data" not in doc, name
            assert all("REPLACE-ME" in v for v in doc["stringData"].values()), doc["metadata"]
        else:  # no other manifest carries a literal credential
            text = json.dumps(doc)
            assert not re.search(r"(SECRET|ACCESS)_KEY\"?:\s*\"\w", text), name


def test_images_are_the_versions_this_checkout_runs():
    images = [c["image"] for _, d in _docs() if d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]]
    prefect_images = [i for i in images if i.startswith("prefecthq/prefect:")]
    assert prefect_images and all(i.split(":")[1].startswith(f"{prefect.__version__}-")
                                  for i in prefect_images), prefect_images


def _rendered_job(variables: dict) -> dict:
    """The Job a flow run would get: the template's placeholders replaced with the pool's
    variable defaults, as the worker renders them (whole-value placeholders keep types)."""
    template = json.loads(TEMPLATE.read_text())
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    values = defaults | {"name": "nightly-compress", "labels": {}, "env": {},
                         "command": ["prefect", "flow-run", "execute"]} | variables

    def render(node: object) -> object:
        if isinstance(node, dict):
            return {k: render(v) for k, v in node.items()}
        if isinstance(node, list):
            return [render(v) for v in node]
        if isinstance(node, str):
            whole = re.fullmatch(r"\{\{ (\w+) \}\}", node)
            if whole:
                return values[whole.group(1)]
            return re.sub(r"\{\{ (\w+) \}\}", lambda m: str(values[m.group(1)]), node)
        return node

    return render(template["job_configuration"]["job_manifest"])  # type: ignore[return-value]


def test_the_work_pool_template_renders_a_valid_job_running_the_image():
    template = json.loads(TEMPLATE.read_text())
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(template["variables"]["properties"]), \
        placeholders - set(template["variables"]["properties"])
    job = _rendered_job({})
    pod = job["spec"]["template"]["spec"]
    # what Prefect's kubernetes worker requires of a job manifest, parallelism and completions
    # inside the pod spec included (its own default template has them there; the API server
    # drops them with a warning: they are Job fields), so strict validation leaves them out
    assert pod["restartPolicy"] == "Never" and pod.pop("parallelism") == pod.pop("completions") == 1
    validate(job)
    (container,) = pod["containers"]
    assert container["name"] == "prefect-job" and container["image"] == "recsqueeze:cpu"
    assert {next(iter(r.values()))["name"] for r in container["envFrom"]} == \
        {"recsqueeze-settings", "recsqueeze-s3"}
    node_ip = next(e for e in container["env"] if e["name"] == "RECSQUEEZE_RAY_NODE_IP")
    assert node_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"  # joins Ray as itself


def _makefile_recipe(target: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_the_image_installs_exactly_as_make_does():
    """One install script: the Makefile's .venv target and the Dockerfile's RUN call it; the
    image holds every package the project installs."""
    make = _makefile_recipe(".venv")
    assert any("infra/install.sh" in line for line in make), make
    docker = (ROOT / "Dockerfile").read_text()
    runs = re.findall(r"^RUN (.+(?:\\\n.+)*)", docker, re.M)
    assert any("infra/install.sh" in r for r in runs), runs
    torch_make = re.search(r"^TORCH \?= (\S+)", (ROOT / "Makefile").read_text(), re.M)
    torch_docker = re.search(r"^ARG TORCH=(\S+)", docker, re.M)
    assert torch_make and torch_docker and torch_make.group(1) == torch_docker.group(1)
    # [tool.setuptools.packages.find] include (no tomllib on Python 3.10)
    found = re.search(r"^include = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M)
    assert found
    include = re.findall(r'"([^"]+)"', found.group(1))
    copied = set(re.findall(r"^COPY (\S+)/ ", docker, re.M))
    assert {p.rstrip("*") for p in include} <= copied, (include, copied)
    assert "pyproject.toml" in docker
    for flag in ("PREFECT_SERVER_ANALYTICS_ENABLED=false", "RAY_USAGE_STATS_ENABLED=0"):
        assert flag in docker
    subprocess.run(["bash", "-n", str(ROOT / "infra" / "install.sh")], check=True)
