"""docker/: the images and cluster specs cannot be built or deployed here, so everything that can be
checked is: Dockerfile lint, the CUDA base against torch's CUDA, install steps = the Makefile's,
the Ray cluster launcher YAML against Ray's schema, Kubernetes objects against Kubernetes' schemas
(RayCluster/RayJob pod templates included), and every entrypoint against st-scale's own checks."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
KUBERAY = DOCKER / "kuberay"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
IMAGE_ROOT = "/opt/st-scale"  # where the Dockerfiles copy the repository


def hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "hadolint"
    return subprocess.run([str(binary), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def run_instructions(dockerfile: Path) -> list[str]:
    """RUN instructions with their continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install -y curl\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout  # the lint really runs


def test_gpu_image_cuda_matches_torch():
    import torch

    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-(\w+)-ubuntu", (DOCKER / "Dockerfile.gpu").read_text(), re.M)
    assert base, "the GPU image must start from an nvidia/cuda image"
    assert f"{base[1]}.{base[2]}" == torch.version.cuda, (
        f"torch {torch.__version__} is built for CUDA {torch.version.cuda}"
    )
    assert base[3] in ("runtime", "cudnn-runtime")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_with_the_makefile(dockerfile):
    """Same commands as `make install`; the interpreter is one pyproject accepts; runs as non-root."""
    text = dockerfile.read_text()
    runs = " ".join(run_instructions(dockerfile))
    assert "make system-deps" in runs
    extras = "\\[gpu\\]" if dockerfile.name == "Dockerfile.gpu" else ""  # NVML: GPU system metrics
    install = re.search(rf"make install PYTHON=(python3\.\d+) VENV=(\S+) EXTRAS={extras} EDITABLE= ", runs)
    assert install, "the image must install through `make install`, without dev extras, not editable"
    minor = int(install[1].split(".")[1])
    requires = re.search(r'requires-python = ">=3\.(\d+),<3\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert int(requires[1]) <= minor < int(requires[2]), f"{install[1]} is outside pyproject's requires-python"
    assert f"ENV PATH={install[2]}/bin:$PATH" in text
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for item in source.split():
            assert (ROOT / item).exists(), f"{dockerfile.name} copies {item}, which is not in the repository"
    copied = {item.rstrip("/") for source in re.findall(r"^COPY (.+) \S+$", text, re.M) for item in source.split()}
    assert {"pyproject.toml", "Makefile", "st_scale", "ds_configs", "tune"} <= copied
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")


def test_the_gpu_extra_brings_nvml():
    """MLflow logs GPU utilisation and memory only where the NVML bindings are installed."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("nvidia-ml-py") for r in extras["gpu"])


def test_both_images_run_the_same_python():
    """Ray refuses a node whose Python minor version differs from the head's: the CPU image (job
    submitter, CPU workers) and the GPU image must join one cluster."""
    interpreters = {}
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        interpreters[dockerfile.name] = re.search(r"make install PYTHON=python(3\.\d+)", text)[1]
        base = re.search(r"^FROM python:(3\.\d+)-", text, re.M)
        if base:  # a python:X.Y base image: its interpreter is the one installed into
            assert base[1] == interpreters[dockerfile.name], dockerfile.name
    assert len(set(interpreters.values())) == 1, interpreters


def test_makefile_targets_the_images_use_exist():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^system-deps:", makefile, re.M) and re.search(r"^install:", makefile, re.M)
    assert "EXTRAS ?=" in makefile and "EDITABLE ?= -e" in makefile and '$(EDITABLE) ".$(EXTRAS)"' in makefile


def test_ray_cluster_launcher_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DOCKER / "ray-cluster-aws.yaml").read_text())
    validate_config(prepare_config(config))
    assert "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])
    assert any("/shared:/shared" in option for option in config["docker"]["run_options"])
    assert not any("ray stop" in c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    broken = yaml.safe_load((DOCKER / "ray-cluster-aws.yaml").read_text())
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # a typo must not pass
    with pytest.raises(Exception, match="additional|min_worker"):
        validate_config(prepare_config(broken))


# ------------------------------------------------------------------------------------ KubeRay
def k8s_validate(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def as_pod_template(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def kuberay_objects() -> list[dict]:
    return [d for path in sorted(KUBERAY.glob("*.yaml")) for d in documents(path)]


def test_kubernetes_objects_validate_strictly():
    standard = [d for d in kuberay_objects() if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in standard} == {"PersistentVolumeClaim", "Deployment", "Service", "StatefulSet"}
    for obj in standard:
        k8s_validate(obj)


def test_schema_check_rejects_a_misspelt_field():
    import kubernetes_validate

    deployment = next(d for d in kuberay_objects() if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(deployment)


def test_raycluster_manifest():
    import ray

    cluster = next(d for d in kuberay_objects() if d["kind"] == "RayCluster")
    spec = cluster["spec"]
    assert cluster["apiVersion"] == "ray.io/v1" and spec["rayVersion"] == ray.__version__
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        assert isinstance(group["rayStartParams"], dict)
        k8s_validate(as_pod_template(group["template"], f"{cluster['metadata']['name']}-{name}"))
        pod = group["template"]["spec"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"st-scale-shared"}
        for container in pod["containers"]:
            assert container["image"].endswith("/st-scale:gpu")
            assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
            assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://st-scale-mlflow:")
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # S3 keys when the Secret exists
                assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "st-scale-s3"
                assert env[key]["valueFrom"]["secretKeyRef"]["optional"] is True
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_mlflow_keeps_its_store_in_postgresql():
    """The MLflow Deployment's `st-scale mlflow-server` parses, its store is the PostgreSQL Service's
    database with the password from the Secret both use; the launcher's head reads a PostgreSQL URI."""
    from st_scale.cli import build_parser
    from st_scale.tracking import is_database

    objects = {(d["kind"], d["metadata"]["name"]): d for d in kuberay_objects()}
    server = objects["Deployment", "st-scale-mlflow"]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(server["command"][1:])
    assert args.command == "mlflow-server" and is_database(args.backend_store)
    assert args.backend_store == "postgresql://mlflow:$(POSTGRES_PASSWORD)@st-scale-postgres:5432/mlflow"
    assert args.artifacts.startswith("/shared/")
    postgres = objects["StatefulSet", "st-scale-postgres"]["spec"]["template"]["spec"]["containers"][0]
    service = objects["Service", "st-scale-postgres"]
    assert service["spec"]["ports"][0]["port"] == 5432
    assert service["spec"]["selector"] == objects["StatefulSet", "st-scale-postgres"]["spec"]["selector"]["matchLabels"]

    def secret_of(container):
        (env,) = [e for e in container["env"] if e["name"] == "POSTGRES_PASSWORD"]
        return env["valueFrom"]["secretKeyRef"]

    assert secret_of(server) == secret_of(postgres) == {"name": "st-scale-postgres", "key": "password"}
    assert {e["name"]: e.get("value") for e in postgres["env"]}.items() >= {
        "POSTGRES_USER": "mlflow",
        "POSTGRES_DB": "mlflow",
    }.items()

    head = " ".join(yaml.safe_load((DOCKER / "ray-cluster-aws.yaml").read_text())["head_start_ray_commands"])
    assert '--backend-store "$(cat /shared/st_scale/mlflow/backend-store.uri)"' in head and "mlflow.db" not in head


def test_shared_volume_claim_matches_mounts():
    claim = next(d for d in kuberay_objects() if d["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "st-scale-shared" and claim["spec"]["accessModes"] == ["ReadWriteMany"]


def entrypoint_argv(job: dict) -> list[str]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "st-scale"
    return argv[1:]


def test_rayjobs_run_valid_st_scale_commands():
    """Each RayJob targets the RayCluster, its submitter validates, and its command passes the same
    checks `st-scale` runs before any worker starts (recipe / sweep spec, overrides)."""
    from st_scale.cli import build_parser
    from st_scale.config import load_config
    from st_scale.sweep.spec import check_spec, load_spec

    cluster = next(d for d in kuberay_objects() if d["kind"] == "RayCluster")
    jobs = [d for d in kuberay_objects() if d["kind"] == "RayJob"]
    assert {entrypoint_argv(j)[0] for j in jobs} == {"train", "sweep"}
    assert any("s3://" in j["spec"]["entrypoint"] and "num_workers=[" in j["spec"]["entrypoint"] for j in jobs)
    for job in jobs:
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        k8s_validate(as_pod_template(job["spec"]["submitterPodTemplate"], job["metadata"]["name"]))
        args = build_parser().parse_args(entrypoint_argv(job))
        if args.command == "train":
            cfg = load_config(args.recipe, args.overrides)
            assert cfg.method.name == "st" and cfg.data.train.startswith("/shared/")
            assert cfg.run.storage_path.startswith(("/shared/", "s3://"))
            if cfg.scaling.elastic:  # checkpoints the nodes reach without a shared folder
                assert cfg.run.storage_path.startswith("s3://") and cfg.run.max_failures != 0
            else:
                assert cfg.run.storage_path.startswith("/shared/")
        else:
            spec = args.spec.replace(IMAGE_ROOT, str(ROOT))
            checked = check_spec(load_spec(spec, args.overrides))
            assert checked.spec.storage_path.startswith("/shared/")
