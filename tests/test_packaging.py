"""Packaging, checked without a Docker engine: the Dockerfile lints clean (hadolint) and its exact CMD and
HEALTHCHECK work against the installed package; the Kubernetes manifests validate against the 1.37
schemas (kubernetes-validate, offline) and agree with the image and the gateway; docker-compose wires
the gateway to Redis and Postgres."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import signal
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from setuptools import find_packages

from feather_grpc import config
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from feather_grpc.server.app import LIVENESS_SERVICE, SERVICE_NAME
from tests.gateway_harness import user
from tests.ops_harness import BIN, REPO, GatewayProcess, free_port, sample, scrape

K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.37.0"
# The oldest Kubernetes the manifests are for: native gRPC probes are GA (on by default since 1.24).
K8S_OLDEST = "1.27.0"


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        (rest,) = self.all(keyword)
        return rest


def dockerfile_stages() -> list[Stage]:
    """The Dockerfile's stages as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    stages: list[Stage] = []
    logical = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        logical += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        keyword, _, rest = logical.strip().partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            stages.append(Stage(rest))
        else:
            stages[-1].instructions.append((keyword.upper(), rest.strip()))
    return stages


def runtime() -> Stage:
    return dockerfile_stages()[-1]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in runtime().all("ENV"):
        for pair in shlex.split(rest):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def exec_form(rest: str) -> list[str]:
    args = json.loads(rest)
    assert isinstance(args, list) and all(isinstance(a, str) for a in args), "use the exec (JSON) form"
    return args


def healthcheck_command() -> list[str]:
    options, _, command = runtime().one("HEALTHCHECK").partition(" CMD ")
    assert "--interval" in options and "--timeout" in options
    return exec_form(command)


def k8s_docs() -> dict[str, dict[str, Any]]:
    """Every manifest by kind."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs
            docs[doc["kind"]] = doc
    return docs


# ---- Dockerfile ----


def test_dockerfile_lints_clean() -> None:
    run = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == ""


def test_dockerfile_shape() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2, "multi-stage: a builder and a runtime"
    builder, final = stages
    assert builder.base.startswith("python:3.11-slim") and " AS builder" in builder.base
    assert final.base.startswith("python:3.11-slim")
    assert any("pip wheel" in run for run in builder.all("RUN")), "the builder builds the wheel"
    assert any("[otel]" in run for run in builder.all("RUN")), "the image can trace (otel extra)"
    assert any("pip wheel" in run and "./clients/python" in run for run in builder.all("RUN")), "the CLI's client"
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    client = tomllib.loads((REPO / "clients" / "python" / "pyproject.toml").read_text())["project"]
    pinned = [d for d in dependencies if d.startswith(client["name"])]
    assert pinned == [f"{client['name']}=={client['version']}"], "the gateway needs the client built beside it"
    assert any("--from=builder" in copy_ for copy_ in final.all("COPY"))
    user = final.one("USER").split(":")[0]
    assert user.isdigit() and int(user) >= 1000, "non-root, numeric so runAsNonRoot can verify it"
    assert set(final.one("EXPOSE").split()) == {image_env()["PORT"], image_env()["METRICS_PORT"]}
    assert exec_form(final.one("CMD"))[:2] == ["feather-grpc", "serve"]
    assert healthcheck_command()[:2] == ["feather-grpc", "health"]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "otel" in extras


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]

    def ignored(path: str) -> bool:
        verdict = False  # Docker's rule: the last pattern that matches decides, and `!` re-includes
        for p in patterns:
            pattern = p.removeprefix("!")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/"):
                verdict = not p.startswith("!")
        return verdict

    copied = [
        src for stage in dockerfile_stages() for c in stage.all("COPY") if "--from" not in c for src in c.split()[:-1]
    ]
    assert copied, "the builder copies sources"
    for src in copied:
        assert (REPO / src).exists() and not ignored(src), src
    for path in (".git", ".venv", "node_modules", "tests", "feather-usage.db", "clients/typescript"):
        assert ignored(path), path


def test_the_wheel_packages_every_module() -> None:
    packages = set(find_packages(str(REPO), include=["feather_grpc*"]))
    with_code = {
        str(p.parent.relative_to(REPO)).replace("/", ".")
        for p in (REPO / "feather_grpc").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert with_code <= packages, f"directories missing __init__.py: {with_code - packages}"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["feather-grpc"] == "feather_grpc.cli:main"


async def test_the_images_start_command_serves_and_its_healthcheck_passes(tmp_path: Path) -> None:
    """Runs CMD and HEALTHCHECK exactly as the image would, with the image's ENV, outside Docker."""
    env = image_env()
    port, metrics_port = free_port(), free_port()
    env["PATH"] = env["PATH"].replace("/opt/venv/bin", str(BIN)).replace("$PATH", os.environ.get("PATH", ""))
    env.update(PORT=str(port), METRICS_PORT=str(metrics_port), FEATHER_LEDGER_PATH=str(tmp_path / "usage.db"))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FEATHER_", "LOG_", "METRICS_"))}
    full_env = {**clean, **env}
    health = healthcheck_command()

    def healthcheck(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*health, *extra], cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=20)

    assert healthcheck().returncode != 0, "nothing is serving yet"
    gw = GatewayProcess.start(exec_form(runtime().one("CMD")), full_env, tmp_path)
    try:
        deadline = time.monotonic() + 20
        while (check := healthcheck()).returncode != 0:
            assert gw.proc.poll() is None, gw.output()
            assert time.monotonic() < deadline, check.stdout + check.stderr + gw.output()
        assert "SERVING" in check.stdout
        for service in (SERVICE_NAME, LIVENESS_SERVICE):  # what the readiness and liveness probes ask
            probe = healthcheck("--service", service)
            assert probe.returncode == 0 and probe.stdout.strip().endswith(": SERVING"), probe.stdout + probe.stderr
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await pb_grpc.FeatherServiceStub(channel).Chat(
                pb.ChatRequest(model="fast", messages=[user("hello from the container test")]), timeout=10
            )
        assert reply.provider == "mock"
        assert sample(scrape(metrics_port), "feather_requests_total", provider="mock", model=reply.model, status="ok")
        (serving,) = gw.logged("serving on")  # LOG_FORMAT=json from the image
        assert serving["port"] == port
        stop = getattr(signal, runtime().one("STOPSIGNAL"))
        gw.proc.send_signal(stop)
        assert await gw.wait_exit() == 0, gw.output()
    finally:
        gw.kill()
    assert healthcheck().returncode != 0, "the health check fails once the server is gone"
    assert (tmp_path / "usage.db").exists(), "the ledger goes where FEATHER_LEDGER_PATH says"


# ---- Kubernetes ----


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    paths = sorted(K8S.glob("*.yaml"))
    assert {p.name for p in paths} >= {
        "namespace.yaml",
        "configmap.yaml",
        "secret.yaml",
        "deployment.yaml",
        "service.yaml",
        "hpa.yaml",
    }
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            for version in (K8S_OLDEST, K8S_VERSION):
                kubernetes_validate.validate(doc, version, strict=True)
    # The validator is live: a misspelt field is rejected.
    bad = copy.deepcopy(k8s_docs()["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servise"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_manifests_agree_with_the_image_and_the_gateway() -> None:
    docs = k8s_docs()
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    image = image_env()

    assert "command" not in container and "args" not in container, "the image's CMD is what CI runs"
    grpc_port = int(env["PORT"]["value"])
    assert str(grpc_port) == image["PORT"] and env["METRICS_PORT"]["value"] == image["METRICS_PORT"]
    assert {p["containerPort"] for p in container["ports"]} == {int(p) for p in runtime().one("EXPOSE").split()}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert container["startupProbe"]["grpc"]["service"] == LIVENESS_SERVICE

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == runtime().one("USER").split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(Path(image["FEATHER_LEDGER_PATH"]).parent)] == "data", "the ledger has a writable volume"
    assert container["resources"]["requests"] and container["resources"]["limits"]

    # The ConfigMap is a valid gateway config, mounted where FEATHER_CONFIG points.
    config_path = Path(env["FEATHER_CONFIG"]["value"])
    assert mounts[str(config_path.parent)] == "config"
    configmap = docs["ConfigMap"]
    assert pod["volumes"][0]["configMap"]["name"] == configmap["metadata"]["name"]
    text = configmap["data"][config_path.name]
    keys = {"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-y"}
    resolved = config.resolve(config.parse_file_config(text, "configmap"), keys, "configmap")
    assert {p.name for p in resolved.providers} == {"openai", "anthropic"}
    secret_keys = set(docs["Secret"]["stringData"])
    for name, entry in env.items():
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == docs["Secret"]["metadata"]["name"], name
            # An optional key may be left out of the example Secret (a placeholder JWT_SECRET would be a
            # guessable signing key); a required one must be there.
            assert ref["key"] in secret_keys or ref.get("optional") is True, name

    # Kubernetes waits longer than the gateway's drain delay plus its drain before SIGKILL.
    drained = config.resolve(
        config.parse_file_config(text, "configmap"), {**keys, "DRAIN_DELAY_MS": env["DRAIN_DELAY_MS"]["value"]}, "x"
    ).server
    assert drained.drain_delay_s == 5
    assert pod["terminationGracePeriodSeconds"] > drained.drain_delay_s + drained.grace_period_s

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container["ports"]}
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    namespace = docs["Namespace"]["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == namespace for kind, d in docs.items() if kind != "Namespace")


# ---- docker compose ----


def test_compose_runs_the_gateway_with_redis_and_postgres() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    gateway = services["gateway"]
    assert gateway["build"] == "."
    assert "50051:50051" in gateway["ports"] and f"{image_env()['METRICS_PORT']}:9464" in gateway["ports"]
    for dependency in ("redis", "postgres"):
        assert gateway["depends_on"][dependency]["condition"] == "service_healthy"
        assert services[dependency]["healthcheck"]["test"]
    redis_host = re.match(r"redis://([^:/]+)", gateway["environment"]["REDIS_URL"])
    assert redis_host and redis_host.group(1) in services
    assert "@postgres:" in gateway["environment"]["DATABASE_URL"]
    grace = re.fullmatch(r"(\d+)s", gateway["stop_grace_period"])
    assert grace and int(grace.group(1)) > config.ServerSpec().grace_period_s, "docker stop must outwait the drain"
