"""Production deployment, compiled offline: ``argo-workflows create --only-json`` on the real flows.

``create --only-json`` still uploads the code package, so the test serves S3 from a local moto
server. It checks what a scheduler would act on: the cron from ``deployment.schedule_cron``
(and no schedule without one), the flow parameters, the GPU limits from ``resources``, the
``@project`` names, that flows/report.py is triggered by the pipeline's end, and num_nodes: 2 (a JobSet gang) with
``resources.env`` (NCCL and EFA settings) in its pods' environment.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "flows" / "pipeline.py"
REPORT_FLOW = REPO / "flows" / "report.py"
BUCKET = "prefflow-deploy-test"
CRON = "0 3 * * ? *"
PROJECT = "prefflow_deploy_test"
TRAIN_GPU, EVAL_GPU = 2, 1
#: Argo template name -> the resources section it must ask for.
GPU_STEPS = {"sft": TRAIN_GPU, "preference": TRAIN_GPU, "evaluate": EVAL_GPU, "reference-outputs": EVAL_GPU}
GPU_STEPS["recursive-onpolicy-round"] = TRAIN_GPU  # on-policy rounds: Argo's template of the self-looping step
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server on a free loopback port with one bucket; skips when moto cannot serve."""
    for module, hint in (("moto.server", "moto[server]"), ("boto3", "boto3"), ("kubernetes", "kubernetes<37")):
        pytest.importorskip(module, reason=f"{hint} not installed (pip install -e '.[dev]')")
    import boto3

    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, **CREDENTIALS),
        )
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    deadline = time.monotonic() + 30
    try:
        while True:
            if proc.poll() is not None:
                pytest.skip(f"moto server exited ({proc.returncode}): {log_path.read_text()[-500:]}")
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception as exc:  # not listening yet
                if time.monotonic() > deadline:
                    pytest.skip(f"moto server did not answer on {endpoint} within 30 s: {exc}")
                time.sleep(0.2)
        yield {"endpoint": endpoint, "client": client}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_config(path: Path, cron: str | None, **resources) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    cfg.setdefault("resources", {})
    cfg["resources"]["train"] = {"cpu": 4, "memory": 16000, "gpu": TRAIN_GPU}
    cfg["resources"]["evaluate"] = {"cpu": 2, "memory": 8000, "gpu": EVAL_GPU}
    cfg["resources"].update(resources)
    cfg["deployment"] = {"project": PROJECT, **({"schedule_cron": cron} if cron else {})}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def compile_argo(flow: Path, config: Path, endpoint: str, tmp_path: Path) -> dict:
    """``python FLOW --config config CONFIG argo-workflows create --only-json`` -> the WorkflowTemplate."""
    env = dict(
        os.environ,
        USERNAME="prefflow",
        HF_HUB_OFFLINE="1",
        **CREDENTIALS,
        METAFLOW_DEFAULT_DATASTORE="s3",
        METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{BUCKET}/metaflow",
        METAFLOW_S3_ENDPOINT_URL=endpoint,
        METAFLOW_KUBERNETES_NAMESPACE="default",
        METAFLOW_DEFAULT_METADATA="local",
        METAFLOW_DATASTORE_SYSROOT_LOCAL=str(tmp_path),
        # needed only by flows with @trigger_on_finish (the names of an Argo Events install)
        METAFLOW_ARGO_EVENTS_EVENT="metaflow-event",
        METAFLOW_ARGO_EVENTS_EVENT_BUS="default",
        METAFLOW_ARGO_EVENTS_EVENT_SOURCE="argo-events-webhook",
        METAFLOW_ARGO_EVENTS_SERVICE_ACCOUNT="operate-workflow-sa",
    )
    cmd = [
        sys.executable,
        str(flow),
        "--no-pylint",
        "--config",
        "config",
        str(config),
        "argo-workflows",
        "create",
        "--only-json",
    ]
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout[proc.stdout.index("{") :])


@pytest.fixture(scope="module")
def pipeline_template(s3_endpoint, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("deploy")
    return compile_argo(PIPELINE, write_config(tmp / "scheduled.yaml", CRON), s3_endpoint["endpoint"], tmp)


def _container_templates(template: dict) -> dict[str, dict]:
    return {t["name"]: t["container"] for t in template["spec"]["templates"] if "container" in t}


def test_schedule_is_the_configured_cron(pipeline_template):
    annotations = pipeline_template["metadata"]["annotations"]
    cron = json.loads(annotations["metaflow/cron"])
    assert cron["schedule"] == "0 3 * * ?"  # Argo takes the first five fields of the AWS form
    assert annotations["metaflow/flow_name"] == "PrefFlow"
    assert annotations["metaflow/project_name"] == PROJECT
    assert annotations["metaflow/project_flow_name"] == f"{PROJECT}.user.prefflow.PrefFlow"


def test_parameters_are_deployed(pipeline_template):
    deployed = {p["name"]: p for p in pipeline_template["spec"]["arguments"]["parameters"]}
    assert {"loss", "set"} <= set(deployed)
    assert json.loads(deployed["loss"]["value"]) == "" and json.loads(deployed["set"]["value"]) == ""
    described = json.loads(pipeline_template["metadata"]["annotations"]["metaflow/parameters"])
    assert described["loss"]["type"] == "str" and described["set"]["type"] == "str"


def test_gpu_limits_follow_the_resources_section(pipeline_template):
    containers = _container_templates(pipeline_template)
    steps = {name for name in containers if name in GPU_STEPS or name in {"start", "prepare-data", "join", "end"}}
    assert set(GPU_STEPS) <= steps
    for name in steps:
        limits = containers[name]["resources"].get("limits") or {}
        expected = GPU_STEPS.get(name)
        assert limits.get("nvidia.com/gpu") == (str(expected) if expected else None), name
    assert containers["sft"]["resources"]["requests"]["cpu"] == "4.0"
    assert containers["evaluate"]["resources"]["requests"]["memory"] == "8000.0M"


def test_kubernetes_image_goes_to_the_heavy_steps_only(s3_endpoint, tmp_path):
    image = "registry.example/prefflow-gpu:1"
    template = compile_argo(
        PIPELINE,
        write_config(tmp_path / "k8s.yaml", None, kubernetes=True, image=image),
        s3_endpoint["endpoint"],
        tmp_path,
    )
    containers = _container_templates(template)
    assert {name for name, c in containers.items() if c["image"] == image} == set(GPU_STEPS)
    assert containers["sft"]["resources"]["limits"]["nvidia.com/gpu"] == str(TRAIN_GPU)
    assert not any("persistentVolumeClaim" in v for t in template["spec"]["templates"] for v in t.get("volumes", []))


def test_no_cron_means_no_schedule(s3_endpoint, tmp_path):
    template = compile_argo(
        PIPELINE, write_config(tmp_path / "unscheduled.yaml", None), s3_endpoint["endpoint"], tmp_path
    )
    cron = template["metadata"]["annotations"].get("metaflow/cron")
    assert cron is None or json.loads(cron)["schedule"] is None  # not Metaflow's default daily schedule


def _package(template: dict, client, step: str) -> tarfile.TarFile:
    env = {e["name"]: e.get("value") for e in _container_templates(template)[step]["env"]}
    bucket, key = env["METAFLOW_CODE_URL"][len("s3://") :].split("/", 1)
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return tarfile.open(fileobj=io.BytesIO(body))


def _package_names(template: dict, client, step: str) -> list[str]:
    return _package(template, client, step).getnames()


def test_report_flow_is_triggered_by_the_pipeline(s3_endpoint, pipeline_template, tmp_path):
    template = compile_argo(
        REPORT_FLOW, write_config(tmp_path / "scheduled.yaml", CRON), s3_endpoint["endpoint"], tmp_path
    )
    names = _package_names(template, s3_endpoint["client"], "start")
    assert ".mf_code/steps/report/generate.py" in names and "report.py" in names
    annotations = template["metadata"]["annotations"]
    pipeline_name = pipeline_template["metadata"]["annotations"]["metaflow/project_flow_name"]
    assert json.loads(annotations["metaflow/triggers"]) == [{"name": f"metaflow.{pipeline_name}.end", "type": "run"}]
    assert annotations["metaflow/project_name"] == PROJECT
    assert "metaflow/cron" not in annotations or json.loads(annotations["metaflow/cron"])["schedule"] is None


def test_code_package_carries_the_steps_library(s3_endpoint, pipeline_template):
    names = _package_names(pipeline_template, s3_endpoint["client"], "sft")
    assert any(n.endswith("steps/pipeline.py") for n in names), sorted(n for n in names if ".mf_code" not in n)
    assert any(n.endswith("steps/report/__init__.py") for n in names)


def test_steps_library_imports_from_the_unpacked_code_package(s3_endpoint, pipeline_template, tmp_path):
    """What a remote pod does: unpack the package and import the step code from it, not from this checkout."""
    _package(pipeline_template, s3_endpoint["client"], "preference").extractall(tmp_path, filter="data")
    code_dir = tmp_path / ".mf_code"
    probe = (
        "import steps.train.loop, steps.pipeline, steps.data.oasst, steps.evaluate.scoring; "
        "print(steps.train.loop.__file__); print(steps.pipeline.__file__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=code_dir,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(code_dir)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.split():
        assert Path(line).resolve().is_relative_to(code_dir.resolve()), line


#: The gang's output volume: a PVC mounted at output_dir on every step that reads or writes it.
CLAIM, MOUNT = "prefflow-runs", "/mnt/prefflow"
GANG_NODES, GANG_RANKS = 2, TRAIN_GPU
#: resources.env of the gang config (AWS EFA): what every training pod's environment must carry, as strings.
NCCL_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": 1, "NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "INFO"}


@pytest.fixture(scope="module")
def gang_template(s3_endpoint, tmp_path_factory) -> dict:
    """``num_nodes: 2`` on Kubernetes with GPUs and a PVC as output_dir."""
    tmp = tmp_path_factory.mktemp("deploy_gang")
    config = write_config(
        tmp / "gang.yaml",
        None,
        kubernetes=True,
        num_nodes=GANG_NODES,
        nproc_per_node=GANG_RANKS,
        persistent_volume_claim=CLAIM,
        output_dir=MOUNT,
        env=NCCL_ENV,
    )
    return compile_argo(PIPELINE, config, s3_endpoint["endpoint"], tmp)


def _jobset(template: dict, name: str) -> dict:
    """The JobSet manifest Argo creates for a @parallel step (its run-time ``{{...}}`` values quoted to parse)."""
    (found,) = [t for t in template["spec"]["templates"] if t["name"] == name]
    text = re.sub(
        r"^(\s*[\w-]+: )(\{\{.*\}\})\s*$", lambda m: m.group(1) + json.dumps(m.group(2)), found["resource"]["manifest"],
        flags=re.M,
    )  # fmt: skip
    return {"resource": found["resource"], "retry": found.get("retryStrategy"), "manifest": yaml.safe_load(text)}


@pytest.mark.parametrize("step", ["sft-nodes", "preference-nodes"])
def test_a_gang_compiles_to_a_jobset_of_num_nodes_pods_with_gpus_shm_and_the_volume(gang_template, step):
    jobset = _jobset(gang_template, step)
    manifest = jobset["manifest"]
    assert manifest["kind"] == "JobSet" and jobset["resource"]["action"] == "create"
    assert manifest["metadata"]["labels"]["prefflow/num-nodes"] == str(GANG_NODES)
    replicated = {job["name"]: job for job in manifest["spec"]["replicatedJobs"]}
    assert set(replicated) == {"control", "worker"}
    assert replicated["control"]["replicas"] == 1  # node 0; the workers are num_parallel - 1, sized at run time
    assert replicated["worker"]["replicas"] == "{{=asInt(inputs.parameters.workerCount)}}"
    (gang_step,) = [t for t in gang_template["spec"]["templates"] if t["name"] == f"{step.split('-')[0]}-gang"]
    assert gang_step["container"]["resources"].get("limits") in ({}, None)  # the gang's start asks for no GPU
    for name, job in replicated.items():
        pod = job["template"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(GANG_RANKS), name
        assert container["resources"]["requests"]["cpu"] == "4.0", name
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        shm = [n for n, path in mounts.items() if path == "/dev/shm"]
        assert len(shm) == 1, name
        # a quarter of the 16000 MB pod memory, in RAM: NCCL's intra-node buffers
        assert volumes[shm[0]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4000Mi"}, name
        assert volumes[CLAIM]["persistentVolumeClaim"] == {"claimName": CLAIM} and mounts[CLAIM] == MOUNT, name
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MF_MASTER_PORT"] == "29500" and "control-0-0" in env["MF_MASTER_ADDR"], name
        assert env["MF_WORLD_SIZE"] == "{{inputs.parameters.num-parallel}}", name
        assert {k: env.get(k) for k in NCCL_ENV} == {k: str(v) for k, v in NCCL_ENV.items()}, name
    assert jobset["retry"]["limit"] == 1  # @retry(times=1) restarts the whole JobSet


def test_with_a_gang_the_volume_is_on_output_steps_and_gpus_only_on_nodes_and_evaluate(gang_template):
    containers = _container_templates(gang_template)
    with_gpu = {name for name, c in containers.items() if (c["resources"].get("limits") or {}).get("nvidia.com/gpu")}
    assert with_gpu == {"evaluate", "reference-outputs"}  # sft and preference only pass the gang's model on
    with_volume = {
        name for name, c in containers.items() if any(m["name"] == CLAIM for m in c.get("volumeMounts") or [])
    }
    assert with_volume == {"prepare-data", "reference-outputs", "sft", "preference", "evaluate", "join"} | {
        "recursive-onpolicy-round"  # an output step, though a gang never reaches it
    }


def test_nccl_settings_reach_the_heavy_steps_and_no_other(gang_template):
    """resources.env goes to the pods that run GPU work (the gang's nodes through their JobSet, above; evaluation and
    the reference outputs here) and nowhere else."""
    containers = _container_templates(gang_template)
    carrying = {name for name, c in containers.items() if {e["name"] for e in c.get("env") or []} >= set(NCCL_ENV)}
    assert carrying == {"evaluate", "reference-outputs"}
    env = {e["name"]: e.get("value") for e in containers["evaluate"]["env"]}
    assert {k: env[k] for k in NCCL_ENV} == {k: str(v) for k, v in NCCL_ENV.items()}
