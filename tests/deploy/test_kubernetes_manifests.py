"""deploy/kubernetes: the manifests are valid Kubernetes objects and run what exists.

- Schemas, offline: every object is validated in strict mode (unknown fields are errors)
  with ``kubernetes-validate``, which ships the Kubernetes JSON schemas generated from
  the OpenAPI of each release (https://github.com/willthames/kubernetes-validate,
  Apache-2.0), against the fixed versions in :data:`KUBERNETES_VERSIONS`.
- Command lines: the broker's container arguments are parsed by the broker's own argparse
  parser (``broker.__main__.build_parser``) and turned into its configuration; the
  agents' by the agent runner's (``python -m agent_sdk run``). An option that does not
  exist fails, as it would in the pod.
- Wiring: probes on a declared port that ``--metrics-bind`` uses; the Service selects the
  broker's pods (and no agent's); each agent names the Service and its tasks port.
- The secure variant, when ``kubectl`` is installed (``kubectl kustomize`` renders it
  offline): rendered with generated keys, validated, its init containers' steps run
  here against a temporary data dir, and the result accepted by the broker's and the
  SDK's own key checks.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import agent_sdk.__main__ as agent_runner
from agent_sdk.agent import STOP_DRAIN_S
from broker.__main__ import build_parser, config_from_args
from broker.config import BrokerConfig, parse_host_port
from cli.pool import BUILT_INS
from wire import curve

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
BASE = KUBE / "base"
#: Fixed versions whose schemas kubernetes-validate ships: the oldest release we claim to
#: support (StatefulSet.spec.serviceName still required) and the newest one shipped.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
#: What the pod's downward API gives $(POD_IP), for parsing the arguments here.
POD_IP = "10.244.1.7"
SERVICE = "orchestrator-broker"
#: The broker's named container ports and the option that binds each.
BROKER_PORT_OPTIONS = {"tasks": "bind", "bus-out": "bus_out", "bus-in": "bus_in",
                       "state": "state_bind", "events": "events_bind",
                       "metrics": "metrics_bind"}


# ------------------------------------------------------------------ loading


def listed_files(directory: Path) -> list[Path]:
    """The resource files a kustomization.yaml lists."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return [directory / name for name in kustomization["resources"]]


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


BASE_FILES = listed_files(BASE)
BASE_DOCS = [doc for path in BASE_FILES for doc in load_docs(path)]


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in objects(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: no container {name!r}"
    return found[0]


def broker_set(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return named(docs, "StatefulSet", "orchestrator-broker")


def agent_deployments(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in objects(docs, "Deployment")
            if d["spec"]["template"]["metadata"]["labels"].get(
                "app.kubernetes.io/component") == "agent"]


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """``$(VAR)`` replaced as the kubelet does (an unknown one stays as it is)."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                   lambda m: env.get(m.group(1), m.group(0)), arg) for arg in args]


def container_env(c: dict[str, Any]) -> dict[str, str]:
    """The container's literal variables, with the pod IP for status.podIP."""
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[var["name"]] = POD_IP
    return env


# ------------------------------------------------------------------ the real parsers


def parse_broker(argv: list[str]) -> Any:
    """The broker's command line as ``python -m broker`` parses it; fails the test on an
    option that does not exist or a bad value (argparse exits 2)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"python -m broker refuses {argv}: exit {e.code}")


class Parsed(Exception):
    """Raised instead of building the agent, once the runner's parser accepted argv."""

    def __init__(self, spec: str, name: str | None, capabilities: list[str] | None,
                 max_concurrent: int | None) -> None:
        super().__init__(spec)
        self.spec = spec


def parse_agent(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Parsed:
    """``python -m agent_sdk ARGV`` through the runner's real parser, stopped before it
    builds the agent or connects."""
    def stop(*args: Any) -> None:
        raise Parsed(*args)

    monkeypatch.setattr(agent_runner, "build_agent", stop)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    try:
        agent_runner.main(argv)
    except Parsed as parsed:
        return parsed
    except SystemExit as e:
        pytest.fail(f"python -m agent_sdk refuses {argv}: exit {e.code}")
    pytest.fail(f"python -m agent_sdk {argv} neither parsed nor failed")


def test_the_parsers_refuse_an_option_that_does_not_exist(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks below would catch an invented option or field."""
    with pytest.raises(pytest.fail.Exception):
        parse_broker(["--bind", "0.0.0.0:5555", "--metrics-port", "9555"])
    with pytest.raises(pytest.fail.Exception):
        parse_agent(["run", "agents.coder:CoderAgent", "--healthcheck"], monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="bogus"):
        validate({**BASE_DOCS[0], "bogus": 1}, KUBERNETES_VERSIONS[0])


# ------------------------------------------------------------------ schemas


def validate(doc: dict[str, Any], version: str) -> None:
    try:
        used = kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(map(str, e.path))
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']} against Kubernetes {version}: "
                    f"{path}: {e.message}")
    # The schemas of that very release, not an older one standing in.
    assert used == ".".join(version.split(".")[:2])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", BASE_FILES, ids=lambda p: p.name)
def test_manifests_are_valid_kubernetes_objects(path: Path, version: str) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        assert "namespace" not in doc["metadata"], "the manifests are namespace-agnostic"
        validate(doc, version)


def test_kustomization_lists_every_manifest() -> None:
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert {p.name for p in BASE_FILES} == on_disk
    assert yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"] == ["base"]


# ------------------------------------------------------------------ the broker


def check_broker(docs: list[dict[str, Any]]) -> None:
    sts = broker_set(docs)
    assert sts["spec"]["replicas"] == 1
    c = container(sts, "broker")
    assert c["command"] == ["python", "-m", "broker"]
    args = parse_broker(expand(c["args"], container_env(c)))
    config = config_from_args(args)  # raises on a value the broker would refuse
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert set(ports) == set(BROKER_PORT_OPTIONS)
    for name, option in BROKER_PORT_OPTIONS.items():
        host, port = parse_host_port(getattr(args, option))
        assert port == ports[name], f"--{option.replace('_', '-')} binds {port}, not {name}"
        # Everything on every interface of the pod, but the HTTP port: on the pod's own
        # address, where the kubelet's probes reach it.
        assert host == (POD_IP if name == "metrics" else "0.0.0.0"), name
    assert config.metrics_bind == f"{POD_IP}:{ports['metrics']}"
    assert not args.no_metrics
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]["httpGet"]
        assert probe["path"] == "/healthz", kind
        port = probe["port"]
        assert (ports[port] if isinstance(port, str) else port) == ports["metrics"], kind
        assert "host" not in probe, f"{kind}: the pod's IP is where --metrics-bind listens"
    # The data dir on the claim template's volume.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    assert claims == ["data"]
    assert args.data_dir.is_relative_to(mounts["data"])
    assert args.data_dir != Path(mounts["data"]), \
        "the data dir is a subdirectory the broker makes 0700, not the volume's root"
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] > BrokerConfig().drain_timeout_s
    assert c["resources"]["requests"] and c["resources"]["limits"]


def test_broker_runs_with_real_options_and_probes_its_metrics_port() -> None:
    check_broker(BASE_DOCS)


def test_service_selects_the_broker_pods_and_exposes_its_ports() -> None:
    sts = broker_set(BASE_DOCS)
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = named(BASE_DOCS, "Service", SERVICE)
    assert service["spec"]["selector"].items() <= labels.items()
    for deployment in agent_deployments(BASE_DOCS):
        agent_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert not service["spec"]["selector"].items() <= agent_labels.items()
    declared = {p["name"]: p["containerPort"] for p in container(sts, "broker")["ports"]}
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(by_name) == set(declared)
    for name, port in by_name.items():
        assert port["targetPort"] == name and port["port"] == declared[name]
    governing = named(BASE_DOCS, "Service", sts["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["selector"].items() <= labels.items()


# ------------------------------------------------------------------ the agents


def check_agents(docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    service = named(docs, "Service", SERVICE)
    tasks_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "tasks")
    deployments = {d["metadata"]["name"]: d for d in agent_deployments(docs)}
    assert set(deployments) == {f"orchestrator-{name}" for name in BUILT_INS}
    for name, built_in in BUILT_INS.items():
        deployment = deployments[f"orchestrator-{name}"]
        assert deployment["spec"]["replicas"] == built_in.default
        c = container(deployment, "agent")
        assert c["command"][:3] == ["python", "-m", "agent_sdk"]
        argv = expand(c["command"][3:] + c["args"], container_env(c))
        parsed = parse_agent(argv, monkeypatch)
        assert parsed.spec == built_in.spec
        agent_runner.load_agent_class(parsed.spec)  # the class exists and is an agent
        broker = argv[argv.index("--broker") + 1]
        assert broker == f"tcp://{SERVICE}:{tasks_port}", deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > STOP_DRAIN_S
        assert pod["securityContext"]["runAsNonRoot"] is True
        # No port to probe: no network probe may be declared on one.
        assert "ports" not in c
        for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert kind not in c, f"{name}: {kind} on an agent, which serves no port"
        assert c["resources"]["requests"] and c["resources"]["limits"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_each_agent_pool_runs_its_built_in_against_the_service(
        monkeypatch: pytest.MonkeyPatch) -> None:
    check_agents(BASE_DOCS, monkeypatch)


def test_agent_pool_selectors_do_not_overlap() -> None:
    deployments = agent_deployments(BASE_DOCS)
    for d in deployments:
        selector = d["spec"]["selector"]["matchLabels"]
        matched = [o["metadata"]["name"] for o in deployments
                   if selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert matched == [d["metadata"]["name"]]


# ------------------------------------------------------------------ the secure variant


def kustomize(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl kustomize renders the overlays (offline)")


@needs_kubectl
def test_the_plain_overlay_renders_the_manifests() -> None:
    rendered = kustomize(KUBE)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in BASE_DOCS)


def run_script(script: str, replacements: dict[str, str], env: dict[str, str]) -> None:
    """An init container's shell step, run here with its paths moved under tmp."""
    for old, new in replacements.items():
        script = script.replace(old, new)
    done = subprocess.run(["sh", "-c", script], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def mount_path(c: dict[str, Any], volume: str) -> str:
    return next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == volume)


@needs_kubectl
def test_secure_variant_renders_valid_objects_whose_keys_the_code_accepts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBE, tree, ignore=shutil.ignore_patterns("keys"))
    keys = tree / "secure" / "keys"
    broker_public, _ = curve.write_key_pair(keys, "broker")
    curve.write_key_pair(keys, "agents")
    docs = kustomize(tree / "secure")
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            validate(doc, version)
    check_broker(docs)
    check_agents(docs, monkeypatch)

    secrets = {d["metadata"]["name"]: d for d in objects(docs, "Secret")}
    sts = broker_set(docs)
    pod = sts["spec"]["template"]["spec"]
    broker = container(sts, "broker")
    assert container_env(broker)["ORCH_SECURE"] == "1"
    (broker_volume,) = [v for v in pod["volumes"] if "secret" in v]
    broker_secret = secrets[broker_volume["secret"]["secretName"]]
    assert set(broker_secret["data"]) == {"broker.key_secret", "broker.key", "agents.key"}

    # The broker's init containers, run here: the key lands 0600 in a 0700 keys dir of
    # the data dir, the agents' key is authorized, and --secure accepts the data dir.
    secret_dir = tmp_path / "broker-secret"
    secret_dir.mkdir()
    for name in broker_secret["data"]:
        shutil.copy(keys / name, secret_dir / name)
        (secret_dir / name).chmod(0o440)  # as the kubelet leaves it with fsGroup
    data_mount = mount_path(broker, "data")
    data_dir = expand(broker["args"], {})[broker["args"].index("--data-dir") + 1]
    local_data = tmp_path / "volume" / Path(data_dir).relative_to(data_mount)
    (tmp_path / "volume").mkdir()
    init = {c["name"]: c for c in pod["initContainers"]}
    secret_mount = mount_path(init["install-broker-key"], "curve-keys")
    run_script(init["install-broker-key"]["command"][2], {secret_mount: str(secret_dir)},
               {"ORCH_HOME": str(local_data)})
    authorize = init["authorize-agents"]
    assert authorize["command"] == ["orchestrator"]
    assert container_env(authorize)["ORCH_HOME"] == data_dir
    from click.testing import CliRunner

    from broker.security import authorized_path, load_authorized, prepare_secure_home
    from cli.main import main as cli

    argv = [a.replace(secret_mount, str(secret_dir)) for a in authorize["args"]]
    result = CliRunner().invoke(cli, argv, env={"ORCH_HOME": str(local_data)})
    assert result.exit_code == 0, result.output
    agents_public = curve.read_public_key(str(keys / "agents.key"))
    grant = load_authorized(authorized_path(local_data))[agents_public]
    assert grant["role"] == "agent"
    assert sorted(grant["names"]) == sorted(BUILT_INS)
    home = prepare_secure_home(local_data)  # what --secure checks and loads
    assert home.broker_public == curve.read_public_key(str(broker_public))

    # Each agent pool: its Secret holds no broker secret; its init container leaves the
    # secret key 0600; the SDK's key settings, from the container's variables, load.
    for deployment in agent_deployments(docs):
        spec = deployment["spec"]["template"]["spec"]
        agent = container(deployment, "agent")
        env = container_env(agent)
        assert set(env) >= {curve.ENV_KEY_FILE, curve.ENV_SERVER_KEY_FILE}
        (volume,) = [v for v in spec["volumes"] if "secret" in v]
        secret = secrets[volume["secret"]["secretName"]]
        assert set(secret["data"]) == {"agents.key_secret", "broker.key"}
        (step,) = spec["initContainers"]
        mounted = tmp_path / deployment["metadata"]["name"]
        copied = mounted / "key"
        copied.mkdir(parents=True)
        moved = {mount_path(step, "curve-keys"): str(mounted / "curve"),
                 mount_path(step, "curve-key"): str(copied)}
        (mounted / "curve").mkdir()
        for name in secret["data"]:
            shutil.copy(keys / name, mounted / "curve" / name)
            (mounted / "curve" / name).chmod(0o440)
        run_script(step["command"][2], moved, {})
        assert mount_path(agent, "curve-key") == mount_path(step, "curve-key")
        assert mount_path(agent, "curve-keys") == mount_path(step, "curve-keys")
        for variable in (curve.ENV_KEY_FILE, curve.ENV_SERVER_KEY_FILE):
            path = env[variable]
            for old, new in moved.items():
                path = path.replace(old, new)
            monkeypatch.setenv(variable, path)
        key_file = Path(os.environ[curve.ENV_KEY_FILE])
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        loaded = curve.client_keys()
        assert loaded is not None and loaded.server_key == home.broker_public
        assert loaded.public_key == agents_public
