"""kubernetes/: the `gpu` pool's base job template and the cluster objects, checked without a
cluster (none is available to pwf's CI): the template against the Kubernetes worker's own
variables and job configuration (prefect-kubernetes renders a trial's Job from it, as its
worker does), the rendered Job and every object of kubernetes/pwf.yaml against the Kubernetes
API's schemas in strict mode (kubernetes-validate: the OpenAPI schemas of each release, offline;
unknown fields are errors), and the pool created from the template on a real Prefect server
with the README's command."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import Flow, FlowRun
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from tests.conftest import ROOT

TEMPLATE = ROOT / "kubernetes" / "gpu-pool.json"
OBJECTS = ROOT / "kubernetes" / "pwf.yaml"
# The oldest Kubernetes release with upstream support when this was written, and the newest
# that kubernetes-validate knows.
VERSIONS = ("1.32.0", kubernetes_validate.utils.latest_version())
AUTH = "pwf:not-a-real-password"
HEAD = "http://head:4200/api"


def template() -> dict:
    return json.loads(TEMPLATE.read_text())


def render(values: dict) -> dict:
    """The Job the Kubernetes worker creates for one flow run, from the template and the
    deployment's job ``values``, by prefect-kubernetes's own code."""

    async def configure() -> KubernetesWorkerJobConfiguration:
        return await KubernetesWorkerJobConfiguration.from_template_and_values(
            template(), values, client=None
        )

    # The worker's settings: its server (an address is enough, nothing is called; without
    # one Prefect would start a temporary server) and the credential it signs in with.
    with temporary_settings({PREFECT_API_URL: HEAD, PREFECT_API_AUTH_STRING: AUTH}):
        configuration = asyncio.run(configure())
        run = FlowRun(id=uuid.uuid4(), name="pwfn b=7 (trial 3)", flow_id=uuid.uuid4())
        flow = Flow(id=run.flow_id, name="pwf-experiment")
        configuration.prepare_for_flow_run(run, None, flow)
    return configuration.job_manifest


def test_the_template_keeps_the_kubernetes_workers_configuration_and_variables():
    default = KubernetesWorker.get_default_base_job_template()
    ours = template()
    assert ours["job_configuration"].keys() == default["job_configuration"].keys()
    for name, schema in default["variables"]["properties"].items():
        assert ours["variables"]["properties"][name].get("type") == schema.get("type"), name
    placeholders = set(re.findall(r"{{\s*(\w+)\s*}}", json.dumps(ours["job_configuration"])))
    assert placeholders == set(ours["variables"]["properties"])  # each variable used, none unset


@pytest.mark.parametrize("version", VERSIONS)
def test_a_trials_job_asks_for_a_gpu_and_mounts_the_shared_artifacts(version):
    """The worker's environment holds the Prefect credential (it signs in with it); the Job it
    writes must not: trials read it from the Secret."""
    job = render({"image": "registry.example.org/pwf:1.0"})
    kubernetes_validate.validate(job, version, strict=True)
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.org/pwf:1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["envFrom"] == [{"secretRef": {"name": "pwf-credentials"}}]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["PREFECT_API_URL"] == HEAD
    assert "PREFECT_API_AUTH_STRING" not in env and AUTH not in json.dumps(job)
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "crash"  # pwf requeues itself
    (claim,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claim["persistentVolumeClaim"]["claimName"] == "pwf-artifacts"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["name"]] == "/app/artifacts"  # the flow runs' artifacts folder
    assert pod["terminationGracePeriodSeconds"] >= 120
    assert pod["serviceAccountName"] == "pwf-jobs"


def test_job_variables_of_a_deployment_are_rendered_and_still_valid():
    job = render({"gpus": 0, "cpu_request": "2", "termination_grace_period_seconds": 60})
    kubernetes_validate.validate(job, VERSIONS[-1], strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 0
    assert container["resources"]["requests"]["cpu"] == "2"
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60


@pytest.mark.parametrize("version", VERSIONS)
def test_the_cluster_objects_are_valid_and_hold_no_credential(version):
    objects = list(yaml.safe_load_all(OBJECTS.read_text()))
    for item in objects:
        kubernetes_validate.validate(item, version, strict=True)
    kinds = {item["kind"]: item for item in objects}
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = kinds["PersistentVolumeClaim"]["metadata"]["name"]
    assert claim == template()["variables"]["properties"]["artifacts_claim"]["default"]
    worker = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["envFrom"] == [{"secretRef": {"name": "pwf-credentials"}}]
    assert "Secret" not in kinds
    values = [e.get("value", "") for e in worker["env"]]
    assert not any(re.search(r"password|auth|token", v, re.I) for v in values)


@pytest.mark.integration
def test_the_readme_creates_the_pool_from_the_template(prefect_server, tmp_path):
    command = (
        "prefect work-pool create gpu --type kubernetes "
        "--base-job-template kubernetes/gpu-pool.json"
    )
    assert command in (ROOT / "README.md").read_text()
    argv = command.replace("create gpu", "create gpu-k8s").split()
    argv[0] = str(Path(sys.executable).parent / "prefect")
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("gpu-k8s")
    assert pool.type == "kubernetes" and pool.base_job_template == template()
