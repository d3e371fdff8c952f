"""deploy/: every manifest parses; each kustomization renders and its rendered output (what
`kubectl apply -k` applies) passes the Kubernetes schemas and checkov; the embedded gateway.yaml
/ signer.yaml pass the real config loaders; sockets, volumes, ports and identities agree across
containers, Services and Vault roles; the image's `pip install .` builds a complete wheel; and
the OpenBao setup script, run against a real `bao server -dev`, yields a token that can do the
signer's job (proved by running the real signer with vault-kv and vault-transit keys) and
nothing else."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support.bao import BaoServer
from support.deploy_tools import RenderError, deploy_tool, render_kustomization
from support.pki import Pki
from support.signer_process import SignerProcess
from svidgate.gateway.config import GatewayConfig
from svidgate.gateway.config import load_config as load_gateway_config
from svidgate.signer.config import SignerConfig
from svidgate.signer.config import load_config as load_signer_config
from svidgate.signer.v1 import signer_pb2, signer_pb2_grpc
from svidgate.signer.vault_policy import signer_policy_hcl

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SETUP = DEPLOY / "vault" / "setup.sh"
POLICY = DEPLOY / "vault" / "signer-policy.hcl"


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml_docs(path):
            objects[(doc["kind"], doc["metadata"].get("name", ""))] = doc
    return objects


def write_and_load_gateway(tmp: Path, text: str) -> GatewayConfig:
    path = tmp / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return load_gateway_config(path)


def write_and_load_signer(tmp: Path, text: str) -> SignerConfig:
    path = tmp / "signer.yaml"
    path.write_text(text, encoding="utf-8")
    return load_signer_config(path)


def under(path: Path | str, mounts: list[str]) -> bool:
    p = PurePosixPath(str(path))
    return any(p == PurePosixPath(m) or PurePosixPath(m) in p.parents for m in mounts)


def gateway_files(cfg: GatewayConfig) -> list[Path]:
    files = [cfg.tls.cert, cfg.tls.key, *(td.bundle for td in cfg.trust_domains.values())]
    for upstream in cfg.upstreams.values():
        if upstream.tls is not None:
            files += [f for f in (upstream.tls.cert, upstream.tls.key, upstream.tls.bundle) if f]
    return files


def port_of(host_port: str) -> int:
    return int(host_port.rpartition(":")[2])


def shell_var(name: str) -> str:
    match = re.search(rf"^{name}=(?:\$\{{{name}:-)?([^}}\s]+)\}}?$", SETUP.read_text(), re.M)
    assert match, name
    return match.group(1)


# ---------------------------------------------------------------------------------------------
# Kubernetes


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    return k8s_objects()


@pytest.fixture(scope="module")
def pod(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return dict(k8s[("Deployment", "svidgate")]["spec"]["template"])


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def mounts_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


@pytest.fixture(scope="module")
def k8s_configs(
    k8s: dict[tuple[str, str], dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[GatewayConfig, SignerConfig]:
    data = k8s[("ConfigMap", "svidgate-config")]["data"]
    tmp = tmp_path_factory.mktemp("k8s-config")
    return write_and_load_gateway(tmp, data["gateway.yaml"]), write_and_load_signer(
        tmp, data["signer.yaml"]
    )


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        docs = yaml_docs(path)
        assert docs, path
        assert all(isinstance(d, dict) for d in docs), path


def test_kustomization_lists_every_manifest(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    kustomization = yaml_docs(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    kinds = {kind for kind, _ in k8s}
    assert {"Deployment", "Service", "ServiceAccount", "ConfigMap", "PodDisruptionBudget"} <= kinds
    namespaces = {o["metadata"].get("namespace") for o in k8s.values() if o["kind"] != "Namespace"}
    assert namespaces == {kustomization["namespace"]}


def test_k8s_configs_load_with_the_real_models(
    k8s_configs: tuple[GatewayConfig, SignerConfig],
) -> None:
    gateway, signer = k8s_configs
    assert gateway.needs_signer
    assert signer.keys.source == "vault-kv"
    assert signer.keys.vault is not None and signer.keys.vault.auth.method == "kubernetes"


def test_k8s_signer_socket_is_shared(
    pod: dict[str, Any], k8s_configs: tuple[GatewayConfig, SignerConfig]
) -> None:
    gateway_cfg, signer_cfg = k8s_configs
    assert signer_cfg.listen.unix is not None
    socket_dir = str(signer_cfg.listen.unix.parent)
    assert gateway_cfg.signer is not None
    assert gateway_cfg.signer.address == f"unix:{signer_cfg.listen.unix}"
    by_name = containers(pod)
    assert by_name["signer"].get("restartPolicy") == "Always"  # native sidecar
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    names = set()
    for name in ("signer", "gateway"):
        mount = mounts_of(by_name[name])[socket_dir]
        assert not mount.get("readOnly", False)
        names.add(mount["name"])
    assert len(names) == 1
    assert "emptyDir" in volumes[names.pop()]


def test_k8s_files_are_mounted(
    pod: dict[str, Any],
    k8s: dict[tuple[str, str], dict[str, Any]],
    k8s_configs: tuple[GatewayConfig, SignerConfig],
) -> None:
    gateway_cfg, signer_cfg = k8s_configs
    by_name = containers(pod)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_map = k8s[("ConfigMap", "svidgate-config")]
    for name, config_file in (("gateway", "gateway.yaml"), ("signer", "signer.yaml")):
        container = by_name[name]
        args = container["args"]
        path = PurePosixPath(args[args.index("--config") + 1])
        # the whole ConfigMap volume is mounted on the config's directory (a subPath mount
        # would never see an edit), projecting only this container's file
        mount = mounts_of(container)[str(path.parent)]
        assert mount["readOnly"] and "subPath" not in mount
        source = volumes[mount["name"]]["configMap"]
        assert source["name"] == "svidgate-config"
        assert source["items"] == [{"key": config_file, "path": path.name}]
        assert config_file in config_map["data"]
        assert args[0] == name
    gateway_mounts = list(mounts_of(by_name["gateway"]))
    for f in gateway_files(gateway_cfg):
        assert under(f, gateway_mounts), f
    vault = signer_cfg.keys.vault
    assert vault is not None
    signer_mounts = list(mounts_of(by_name["signer"]))
    assert vault.ca_cert is not None and under(vault.ca_cert, signer_mounts)
    assert under(vault.auth.jwt_file, signer_mounts)
    # the projected service-account token lands exactly where the signer reads it
    token_mount = next(
        m for m in by_name["signer"]["volumeMounts"] if under(vault.auth.jwt_file, [m["mountPath"]])
    )
    source = volumes[token_mount["name"]]["projected"]["sources"][0]["serviceAccountToken"]
    assert PurePosixPath(token_mount["mountPath"]) / source["path"] == PurePosixPath(
        str(vault.auth.jwt_file)
    )
    assert source["audience"] == "vault"
    assert "audience=vault" in SETUP.read_text()


def test_k8s_ports_and_selectors_agree(
    pod: dict[str, Any],
    k8s: dict[tuple[str, str], dict[str, Any]],
    k8s_configs: tuple[GatewayConfig, SignerConfig],
) -> None:
    gateway_cfg, signer_cfg = k8s_configs
    # the signer sidecar is probed over HTTP on its admin listener, which must bind the pod IP
    # (the kubelet probes that, not the container's loopback)
    signer = containers(pod)["signer"]
    assert signer_cfg.admin_listen is not None
    host, _, port = str(signer_cfg.admin_listen).rpartition(":")
    assert host == "0.0.0.0"
    signer_ports = {p["name"]: p["containerPort"] for p in signer["ports"]}
    assert signer_ports["signer-admin"] == int(port)
    assert signer["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "signer-admin"}
    assert signer["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "signer-admin"}
    gateway = containers(pod)["gateway"]
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports["https"] == port_of(gateway_cfg.listen)
    assert gateway_cfg.admin_listen is not None
    assert ports["admin"] == port_of(gateway_cfg.admin_listen)
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"]["port"] in ("admin", ports["admin"])
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    service = k8s[("Service", "svidgate")]
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] in ("https", ports["https"])
    labels = pod["metadata"]["labels"]
    deployment = k8s[("Deployment", "svidgate")]
    for selector in (
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"],
        k8s[("PodDisruptionBudget", "svidgate")]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert (
        k8s[("PodDisruptionBudget", "svidgate")]["spec"]["minAvailable"]
        < deployment["spec"]["replicas"]
    )


def assert_unprivileged(pod: dict[str, Any]) -> None:
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    for container in containers(pod).values():
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]


def test_k8s_runs_unprivileged(pod: dict[str, Any]) -> None:
    assert_unprivileged(pod)


def test_k8s_vault_role_matches_service_account(
    pod: dict[str, Any],
    k8s: dict[tuple[str, str], dict[str, Any]],
    k8s_configs: tuple[GatewayConfig, SignerConfig],
) -> None:
    _, signer_cfg = k8s_configs
    account = pod["spec"]["serviceAccountName"]
    assert ("ServiceAccount", account) in k8s
    assert shell_var("SERVICE_ACCOUNT") == account
    assert (
        shell_var("SIGNER_NAMESPACE") == k8s[("ServiceAccount", account)]["metadata"]["namespace"]
    )
    assert signer_cfg.keys.vault is not None
    assert shell_var("ROLE") == signer_cfg.keys.vault.auth.role


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under deploy/ (deploy/k8s*/**), kustomizations included."""
    return sorted(p for d in DEPLOY.glob("k8s*") for p in d.rglob("*.yaml"))


def applied_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    """(source, object) for what is applied: each kustomization's render (an overlay's patches
    are partial objects, never applied alone) and each manifest outside a kustomization."""
    for directory in kustomization_dirs():
        for doc in yaml.safe_load_all(render_kustomization(directory)):
            if doc is not None:
                yield directory, doc
    for path in standalone_manifests():
        for doc in yaml_docs(path):
            yield path, doc


def pod_specs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path, doc in applied_objects():
        spec = doc.get("spec", {})
        if doc.get("kind") == "Pod":
            yield path, spec
        elif isinstance(spec.get("template"), dict):
            yield path, spec["template"].get("spec", {})
        elif isinstance(spec.get("jobTemplate"), dict):
            yield path, spec["jobTemplate"]["spec"]["template"]["spec"]


def test_k8s_nothing_that_reloads_is_mounted_with_subpath() -> None:
    """A ConfigMap or Secret mounted with subPath is never updated in a running pod."""
    seen = 0
    for path, spec in pod_specs():
        for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            for mount in container.get("volumeMounts", []):
                seen += 1
                assert "subPath" not in mount and "subPathExpr" not in mount, (path, mount)
    assert seen


DIGEST = re.compile(r"^[a-z0-9.-]+(?::\d+)?(?:/[a-z0-9._-]+)+@sha256:[0-9a-f]{64}$")


def test_k8s_images_are_pinned_by_digest() -> None:
    """A tag can be moved to other content; a digest cannot (deploy/README: "Image digest")."""
    images = [
        c["image"]
        for _, spec in pod_specs()
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]
    ]
    assert images
    for image in images:
        assert DIGEST.match(image), f"{image}: use name@sha256:<digest>, not a tag"
    for path in manifest_files():
        for doc in yaml_docs(path):
            for entry in doc.get("images", []) if doc.get("kind") == "Kustomization" else []:
                assert "newTag" not in entry and "digest" in entry, (path, entry)


def assert_hardened_and_bounded(pod: dict[str, Any]) -> None:
    spec = pod["spec"]
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    # only the signer reads a (projected, audience-bound) token; nothing automounts one
    assert spec["automountServiceAccountToken"] is False
    for name, container in containers(pod).items():
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"], name
        assert resources["limits"]["memory"], name
        assert container["imagePullPolicy"] == "IfNotPresent", name


def test_k8s_pods_are_hardened_and_bounded(pod: dict[str, Any]) -> None:
    assert_hardened_and_bounded(pod)


def network_policy(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return dict(k8s[("NetworkPolicy", "svidgate")]["spec"])


def test_k8s_network_policy_opens_the_data_port_and_fences_the_admin_ports(
    pod: dict[str, Any],
    k8s: dict[tuple[str, str], dict[str, Any]],
    k8s_configs: tuple[GatewayConfig, SignerConfig],
) -> None:
    gateway_cfg, signer_cfg = k8s_configs
    spec = network_policy(k8s)
    assert spec["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert spec["policyTypes"] == ["Ingress"]
    data_port = port_of(gateway_cfg.listen)
    open_ports, fenced_ports = set(), set()
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule["ports"]}  # a rule without ports would open all
        if "from" not in rule:
            open_ports |= ports
            continue
        assert rule["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ]
        fenced_ports |= ports
    assert open_ports == {data_port}
    # every other port a container listens on is reachable from the monitoring namespace only
    listening = {p["containerPort"] for c in containers(pod).values() for p in c.get("ports", [])}
    assert listening - {data_port} == fenced_ports
    assert gateway_cfg.admin_listen is not None
    assert port_of(gateway_cfg.admin_listen) in fenced_ports
    assert signer_cfg.admin_listen is not None
    assert port_of(str(signer_cfg.admin_listen)) in fenced_ports


def test_k8s_metrics_are_scraped_from_the_admin_port(
    pod: dict[str, Any], k8s_configs: tuple[GatewayConfig, SignerConfig]
) -> None:
    gateway_cfg, _ = k8s_configs
    assert gateway_cfg.admin_listen is not None
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port_of(gateway_cfg.admin_listen))
    assert annotations["prometheus.io/path"] == "/metrics"
    (monitor,) = yaml_docs(K8S / "monitoring" / "podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    named = {
        p["name"]: p["containerPort"] for c in containers(pod).values() for p in c.get("ports", [])
    }
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    for endpoint in endpoints:
        assert endpoint["port"] in named and endpoint["path"] == "/metrics"
    assert {e["port"] for e in endpoints} == {"admin", "signer-admin"}
    assert named["admin"] == port_of(gateway_cfg.admin_listen)


# ---------------------------------------------------------------------------------------------
# Validators: Kubernetes schemas, checkov, hadolint (installed by .ci/deploy-lint)

# The Kubernetes versions deploy/ supports: the native sidecar needs >= 1.29; the newest is the
# newest schema the pinned kubernetes-validate carries offline.
K8S_VERSIONS = [f"1.{minor}.0" for minor in range(29, 38)]
# API groups of custom resources and tools, which have no schema offline.
NO_SCHEMA_GROUPS = ("kustomize.config.k8s.io/", "monitoring.coreos.com/", "spire.spiffe.io/")


def run_tool(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def kustomization_dirs() -> list[Path]:
    """Every kustomization under deploy/k8s*/: the base deploy/k8s and its overlays."""
    return sorted(p.parent for d in DEPLOY.glob("k8s*") for p in d.rglob("kustomization.yaml"))


def kustomization_inputs(directory: Path) -> tuple[set[Path], set[Path]]:
    """(resource files, patch files) that DIRECTORY's rendering reads, through its bases."""
    kustomization = yaml_docs(directory / "kustomization.yaml")[0]
    resources: set[Path] = set()
    patches = {(directory / p["path"]).resolve() for p in kustomization.get("patches", [])}
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            base_resources, base_patches = kustomization_inputs(path)
            resources |= base_resources
            patches |= base_patches
        else:
            resources.add(path)
    return resources, patches


def standalone_manifests() -> list[Path]:
    """Manifests no kustomization renders (kustomization.yaml files, deploy/k8s/monitoring/):
    validated file by file. Resources and patches are validated as part of their render."""
    rendered: set[Path] = set()
    for directory in kustomization_dirs():
        rendered |= set.union(*kustomization_inputs(directory))
    return [p for p in manifest_files() if p.resolve() not in rendered]


def render_name(directory: Path) -> str:
    return directory.relative_to(DEPLOY).as_posix().replace("/", "-")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """deploy/<kustomization> → a file holding its `kustomize build` output."""
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for directory in kustomization_dirs():
        try:
            text = render_kustomization(directory)
        except RenderError as exc:
            pytest.fail(f"{directory.relative_to(ROOT)} does not render: {exc}", pytrace=False)
        files[render_name(directory)] = out / f"{render_name(directory)}.yaml"
        files[render_name(directory)].write_text(text, encoding="utf-8")
    return files


# Kinds without a namespace: kustomize knows Namespace, not the custom resources.
CLUSTER_SCOPED = ("Namespace", "ClusterSPIFFEID")


def object_ids(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=render_name)
def test_kustomization_renders_every_resource_once(directory: Path) -> None:
    """`kustomize build` accepts the kustomization (a patch naming no object, or a missing file,
        fails here) and renders exactly the objects of its resource files, each namespaced object in
    the base's namespace and no cluster-scoped one in any."""
    docs = [d for d in yaml.safe_load_all(render_kustomization(directory)) if d]
    resources, _ = kustomization_inputs(directory)
    expected = [d for path in resources for d in yaml_docs(path)]
    assert len(docs) == len(expected) and object_ids(docs) == object_ids(expected)
    namespace = yaml_docs(K8S / "kustomization.yaml")[0]["namespace"]
    for d in docs:
        expected = None if d["kind"] in CLUSTER_SCOPED else namespace
        assert d["metadata"].get("namespace") == expected, d["kind"]


def broken_overlay(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of deploy/k8s and deploy/k8s-spire whose deployment patch has OLD replaced."""
    shutil.copytree(K8S, tmp_path / "k8s")
    shutil.copytree(DEPLOY / "k8s-spire", tmp_path / "k8s-spire")
    patch = tmp_path / "k8s-spire" / "deployment.yaml"
    text = patch.read_text(encoding="utf-8")
    assert old in text
    patch.write_text(text.replace(old, new, 1), encoding="utf-8")
    return tmp_path / "k8s-spire"


@pytest.mark.parametrize(
    ("old", "new"),
    [("  name: svidgate\n", "  name: svidgate-renamed\n"), ("kind: Deployment", "kind: Deploy")],
    ids=["patch-names-no-deployment", "patch-names-no-kind"],
)
def test_a_patch_that_matches_nothing_fails_to_render(tmp_path: Path, old: str, new: str) -> None:
    """A patch that no longer fits the base fails the render instead of being dropped."""
    with pytest.raises(RenderError, match=r"no resource matches strategic merge patch"):
        render_kustomization(broken_overlay(tmp_path, old, new))


def assert_rendered_pods_fit(docs: list[dict[str, Any]]) -> None:
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        pod = deployment["spec"]["template"]
        assert_unprivileged(pod)
        assert_hardened_and_bounded(pod)
        for container_name, container in containers(pod).items():
            assert DIGEST.match(container["image"]), container_name
            assert container["readinessProbe"] and container["livenessProbe"], container_name


@pytest.mark.parametrize("name", [render_name(d) for d in kustomization_dirs()])
def test_rendered_pods_are_hardened_bounded_probed_and_pinned(
    rendered: dict[str, Path], name: str
) -> None:
    """Overlays inherit the base's securityContext, resources, probes and digests."""
    assert_rendered_pods_fit(yaml_docs(rendered[name]))


def test_a_patch_naming_an_unknown_container_fails_the_rendered_checks(tmp_path: Path) -> None:
    """A strategic-merge patch naming no container adds a bare one: it renders, and the
    checks on the render reject it."""
    overlay = broken_overlay(tmp_path, "- name: gateway", "- name: gateway-renamed")
    docs = [d for d in yaml.safe_load_all(render_kustomization(overlay)) if d]
    with pytest.raises((AssertionError, KeyError)):
        assert_rendered_pods_fit(docs)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly_against_the_kubernetes_schemas(
    rendered: dict[str, Path], version: str
) -> None:
    """Each rendered kustomization, and each manifest outside one, on its own."""
    files = [*rendered.values(), *standalone_manifests()]
    done = run_tool(
        [deploy_tool("kubernetes-validate"), "--strict", "-k", version, *map(str, files)]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # an unknown kind is only a warning for the tool: accept it for the known CRD groups only
    for line in done.stdout.splitlines() + done.stderr.splitlines():
        if "Couldn't find schema" in line:
            assert any(f"api version {g}" in line for g in NO_SCHEMA_GROUPS), line
    objects = sum(len(yaml_docs(p)) for p in files)
    assert done.stdout.count("INFO") + done.stdout.count("WARN") >= objects, done.stdout


def test_manifests_and_dockerfile_pass_checkov(rendered: dict[str, Path]) -> None:
    """Every finding on the rendered kustomizations, the manifests outside them and the
    Dockerfile is fixed or skipped inline with a reason that deploy/README.md lists."""
    files = [*rendered.values(), *standalone_manifests(), DEPLOY / "Dockerfile"]
    done = run_tool(
        [
            deploy_tool("checkov"),
            "-f",
            *map(str, files),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--compact",
            "--quiet",
            "--skip-download",
        ]
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "kubernetes scan results" in done.stdout and "dockerfile scan results" in done.stdout


def checkov_skips() -> set[str]:
    skips = set()
    for path in [*manifest_files(), DEPLOY / "Dockerfile"]:
        text = path.read_text(encoding="utf-8")
        skips |= set(re.findall(r"checkov\.io/skip\d+: (CKV\w+)=\S", text))
        skips |= set(re.findall(r"# checkov:skip=(CKV\w+): \S", text))
    return skips


def test_every_checkov_skip_has_a_reason_in_the_readme() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    skips = checkov_skips()
    assert skips
    for check in skips:
        assert re.search(rf"^\| `{check}` \| .+ \| .{{20,}} \|$", readme, re.M), check


def test_dockerfile_passes_hadolint() -> None:
    done = run_tool([deploy_tool("hadolint"), "--no-color", str(DEPLOY / "Dockerfile")])
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------
# Compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml_docs(DEPLOY / "compose.yaml")[0]


def service_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """container path → (source, read-only) for short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def compose_config(compose: dict[str, Any], service: str) -> Path:
    svc = compose["services"][service]
    cmd = svc["command"]
    container_path = cmd[cmd.index("--config") + 1]
    source, read_only = service_mounts(svc)[container_path]
    assert read_only
    return (DEPLOY / source).resolve()


def test_compose_configs_load_and_agree(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway_cfg = load_gateway_config(compose_config(compose, "gateway"))
    signer_cfg = load_signer_config(compose_config(compose, "signer"))
    # the socket directory is one shared named volume, writable in both
    assert signer_cfg.listen.unix is not None and gateway_cfg.signer is not None
    assert gateway_cfg.signer.address == f"unix:{signer_cfg.listen.unix}"
    socket_dir = str(signer_cfg.listen.unix.parent)
    sources = {name: service_mounts(services[name])[socket_dir] for name in ("gateway", "signer")}
    assert len({s for s, _ in sources.values()}) == 1
    assert not any(ro for _, ro in sources.values())
    assert next(iter(sources.values()))[0] in compose["volumes"]
    # files the gateway reads are mounted
    gateway_mounts = list(service_mounts(services["gateway"]))
    for f in gateway_files(gateway_cfg):
        assert under(f, gateway_mounts), f
    # published port → gateway listen port
    published = services["gateway"]["ports"][0].split(":")
    assert int(published[-1]) == port_of(gateway_cfg.listen)
    # the upstream URL names the upstream service and the port it listens on
    url = gateway_cfg.upstreams["echo"].url
    host, port = url.removeprefix("https://").split(":")
    assert host in services
    listen = next(a for a in services[host]["command"] if a.startswith("--listen="))
    assert port_of(listen) == int(port)
    # vault: the signer talks to the openbao service and reads the token vault-setup writes
    vault = signer_cfg.keys.vault
    assert vault is not None
    assert vault.address.split("//")[1].split(":")[0] in services
    token_dir = str(vault.auth.token_file.parent) if vault.auth.token_file else ""
    token_volume, _ = service_mounts(services["signer"])[token_dir]
    setup_env = services["vault-setup"]["environment"]
    setup_dir = str(PurePosixPath(setup_env["TOKEN_FILE"]).parent)
    assert service_mounts(services["vault-setup"])[setup_dir][0] == token_volume
    assert PurePosixPath(setup_env["TOKEN_FILE"]).name == vault.auth.token_file.name  # type: ignore[union-attr]
    # the image's HEALTHCHECK fits the gateway only: the others turn it off, the gateway asks
    # its own admin listener
    for name, svc in services.items():
        if svc.get("image") == "svidgate:dev" and name not in ("gateway", "signer"):
            assert svc["healthcheck"] == {"disable": True}, name
    assert signer_cfg.admin_listen is not None
    assert (
        f"http://{signer_cfg.admin_listen}/readyz" in services["signer"]["healthcheck"]["test"][-1]
    )
    assert services["gateway"]["depends_on"]["signer"] == {"condition": "service_healthy"}
    assert gateway_cfg.admin_listen is not None
    assert (
        f"http://{gateway_cfg.admin_listen}/readyz"
        in services["gateway"]["healthcheck"]["test"][-1]
    )
    # every bind-mounted file exists
    for svc in services.values():
        for source, _ in service_mounts(svc).values():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source


def test_compose_pki_script_issues_what_the_configs_use(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    script = DEPLOY / "compose" / "pki-init.sh"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PKI_DIR": str(tmp_path)}
    for _ in range(2):  # idempotent
        done = subprocess.run(
            ["sh", str(script)], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
    gateway_cfg = load_gateway_config(compose_config(compose, "gateway"))
    pki_root = PurePosixPath("/var/lib/svidgate/pki")
    for f in gateway_files(gateway_cfg):
        rel = PurePosixPath(str(f)).relative_to(pki_root)
        assert (tmp_path / rel).exists(), rel


# ---------------------------------------------------------------------------------------------
# Image


def test_dockerfile_installs_the_package_as_non_root(tmp_path: Path) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", text, re.M)
    # production builds on python:3.11-slim; the container smoke test passes its local base
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert "pip install --no-cache-dir --no-deps --no-build-isolation /src " in text
    copies = re.findall(r"^COPY (\S+(?: \S+)*) (/src/\S*)$", text, re.M)
    assert copies
    # build the wheel from exactly what the image copies: `pip install /src` gets everything
    for sources, dest in copies:
        for src in sources.split():
            rel = PurePosixPath(dest).relative_to("/src")
            target = tmp_path / "src" / (rel / src if dest.endswith("/") else rel)
            path = ROOT / src
            if path.is_dir():
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(tmp_path / "src"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("svidgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # every module of every package folder is in the wheel, and every folder with an
    # __init__.py under a package folder is itself a listed package (a forgotten subpackage
    # works in an editable install and is missing from the image)
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    for name, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            sub = ".".join((name, *rel.parts))
            assert sub in listed or sub.split(".")[-1] == "__pycache__", sub
        for module in (ROOT / folder).glob("*.py"):
            assert f"{name.replace('.', '/')}/{module.name}" in names, module
    for needed in ("svidgate/signer/v1/signer_pb2.py", "svidgate/gateway/http1/protocol.py"):
        assert needed in names, needed
    # every Python package of the source tree is in the wheel (a subpackage missing from
    # pyproject's packages list installs fine and fails at import)
    package_dirs = {
        "svidgate": ROOT / "svidgate",
        "svidgate/pki": ROOT / "pki",
        "svidgate/signer": ROOT / "signer",
        "svidgate/gateway": ROOT / "gateway",
    }
    for prefix, folder in package_dirs.items():
        for init in folder.rglob("__init__.py"):
            rel = init.relative_to(folder).as_posix()
            assert f"{prefix}/{rel}" in names, f"{prefix}/{rel}: add it to pyproject packages"
    # generic top-level names would collide with other distributions in a user's environment
    tops = {n.split("/", 1)[0] for n in names if not n.startswith("svidgate-")}
    assert tops == {"svidgate"}, tops
    assert any(n.endswith("entry_points.txt") for n in names)


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """deploy/requirements.lock: normalized name → (version, hashes)."""
    text = (DEPLOY / "requirements.lock").read_text(encoding="utf-8")
    entries = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", block)
        if head:
            name = canonicalize_name(head.group(1))
            entries[name] = (head.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return entries


def test_image_dependencies_come_from_the_hashed_lock() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "COPY deploy/requirements.lock /tmp/requirements.lock" in text
    assert "pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements.lock" in text
    # the project itself resolves nothing: every other file came from the lock, by hash
    assert len(re.findall(r"pip install ", text)) == 2
    entries = lock_entries()
    assert entries
    for name, (_, hashes) in entries.items():
        assert hashes, f"{name} has no --hash in deploy/requirements.lock"
    project = pyproject()
    wanted = [Requirement(r) for r in project["project"]["dependencies"]]
    build = [Requirement(r) for r in project["build-system"]["requires"]]
    build_in = (DEPLOY / "requirements-build.in").read_text(encoding="utf-8")
    assert [Requirement(r) for r in re.findall(r"^[^#\s]\S*$", build_in, re.M)] == build
    for req in [*wanted, *build]:
        if req.marker is not None and not req.marker.evaluate({"sys_platform": "linux"}):
            continue
        name = canonicalize_name(req.name)
        assert name in entries, f"{req} is not locked: run `make deploy-lock`"
        assert req.specifier.contains(entries[name][0], prereleases=True), (
            f"{req}: the lock pins {entries[name][0]}; run `make deploy-lock`"
        )


def test_image_has_labels_and_a_healthcheck(compose: dict[str, Any]) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    labels = dict(re.findall(r"(org\.opencontainers\.image\.[a-z.]+)=\"([^\"]*)\"", text))
    project = pyproject()["project"]
    assert labels["org.opencontainers.image.title"] == project["name"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert re.search(rf"^ARG VERSION={re.escape(project['version'])}$", text, re.M)
    for key in ("revision", "created", "description", "base.name"):
        assert f"org.opencontainers.image.{key}" in labels, key
    # the HEALTHCHECK asks the gateway's admin /healthz on the port gateway.yaml gives it
    url = re.search(r"HEALTHCHECK_URL=(\S+)", text)
    assert url is not None
    gateway_cfg = load_gateway_config(compose_config(compose, "gateway"))
    assert gateway_cfg.admin_listen is not None
    assert url.group(1) == f"http://{gateway_cfg.admin_listen}/healthz"
    assert re.search(r"^HEALTHCHECK .*\\\n  CMD \[\"python\", .*HEALTHCHECK_URL", text, re.M)


def test_dockerignore_admits_what_the_image_copies() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"  # the context holds only what is admitted (no .venv, build/, .git)
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    text = (DEPLOY / "Dockerfile").read_text()
    for sources, _ in re.findall(r"^COPY (\S+(?: \S+)*) (\S+)$", text, re.M):
        for src in sources.split():
            assert src in admitted, src


# ---------------------------------------------------------------------------------------------
# OpenBao: policy + setup script against a real dev server


def test_policy_file_is_the_generated_least_privilege_policy(
    k8s_configs: tuple[GatewayConfig, SignerConfig], compose: dict[str, Any]
) -> None:
    compose_signer = load_signer_config(compose_config(compose, "signer"))
    for cfg in (k8s_configs[1], compose_signer):
        vault = cfg.keys.vault
        assert vault is not None
        expected = signer_policy_hcl(
            kv_mount=vault.kv_mount,
            kv_path=vault.kv_path,
            transit_mount=vault.transit_mount,
            transit_key=vault.transit_key,
        )
        assert POLICY.read_text() == expected


def test_signer_policy_is_least_privilege() -> None:
    hcl = signer_policy_hcl(kv_mount="kv", kv_path="a/b", transit_mount="t", transit_key="k")
    paths = re.findall(r'^path "([^"]+)"', hcl, flags=re.MULTILINE)
    assert paths == [
        "kv/data/a/b",
        "kv/metadata/a/b",
        "kv/config",
        "kv/destroy/a/b",
        "t/sign/k",
        "t/keys/k",
        "t/keys/k/rotate",
        "auth/token/lookup-self",
        "auth/token/renew-self",
    ]
    assert "*" not in hcl and "sudo" not in hcl and "delete" not in hcl


class Vault:
    def __init__(self, server: BaoServer, token: str) -> None:
        self.server = server
        self.token = token

    def status(self, method: str, path: str, body: dict[str, Any] | None = None) -> int:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.server.address}/v1/{path}",
            data=data,
            method=method,
            headers={"X-Vault-Token": self.token, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)


@pytest.fixture(scope="module")
def vault_setup(
    bao: BaoServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """deploy/vault/setup.sh, run twice against the session's OpenBao; its output directory.

    The script writes its policy under the name the suite's signer tokens use (svidgate-signer,
    scoped to svidgate/signing-keys and svidgate-jwt): the suite's policy is restored after this
    module's tests."""
    out = tmp_path_factory.mktemp("vault-setup")
    # the k8s API server's CA: any CA certificate will do, the script only stores it
    (out / "k8s-ca.pem").write_bytes(pki.bundle().read_bytes())
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "VAULT_CLI": "bao",
        "BAO_ADDR": bao.address,
        "BAO_TOKEN": bao.root_token,
        "HOME": str(out),
        "KUBERNETES_CA_CERT": str(out / "k8s-ca.pem"),
        "TOKEN_FILE": str(out / "signer-token"),
        "APPROLE_DIR": str(out / "approle"),
    }
    try:
        for _ in range(2):  # idempotent: a second run changes nothing and succeeds
            done = subprocess.run(
                ["sh", str(SETUP)], env=env, capture_output=True, text=True, timeout=60, check=False
            )
            assert done.returncode == 0, done.stderr
        yield out
    finally:
        bao.setup_signer()


def test_setup_script_token_can_do_the_signers_job(bao: BaoServer, vault_setup: Path) -> None:
    server, out = bao, vault_setup
    token_file = out / "signer-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    vault = Vault(server, token_file.read_text().strip())
    kv = "secret/data/svidgate/signing-keys"
    assert vault.status("POST", kv, {"data": {"k": "v"}, "options": {"cas": 0}}) == 200
    assert vault.status("GET", kv) == 200
    assert vault.status("GET", "secret/metadata/svidgate/signing-keys") == 200
    assert vault.status("POST", "secret/destroy/svidgate/signing-keys", {"versions": [1]}) in (
        200,
        204,
    )
    assert vault.status("POST", "transit/keys/svidgate-jwt", {"type": "ecdsa-p256"}) in (200, 204)
    assert vault.status("GET", "transit/keys/svidgate-jwt") == 200
    assert vault.status("POST", "transit/sign/svidgate-jwt", {"input": "aGVsbG8="}) == 200
    assert vault.status("POST", "transit/keys/svidgate-jwt/rotate", {}) in (200, 204)
    assert vault.status("GET", "auth/token/lookup-self") == 200
    assert vault.status("POST", "auth/token/renew-self", {}) == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "secret/data/other"),
        ("POST", "secret/data/svidgate/other"),
        ("GET", "secret/data/svidgate/signing-keys-2"),
        ("DELETE", "secret/metadata/svidgate/signing-keys"),
        ("POST", "secret/metadata/svidgate/signing-keys"),
        ("LIST", "secret/metadata/"),
        ("POST", "transit/keys/other"),
        ("POST", "transit/sign/other"),
        ("POST", "transit/keys/svidgate-jwt/config"),
        ("POST", "transit/export/signing-key/svidgate-jwt"),
        ("GET", "sys/policies/acl/svidgate-signer"),
        ("PUT", "sys/policies/acl/svidgate-signer"),
        ("GET", "sys/mounts"),
        ("POST", "auth/token/create"),
    ],
)
def test_setup_script_token_cannot_do_anything_else(
    bao: BaoServer, vault_setup: Path, method: str, path: str
) -> None:
    server, out = bao, vault_setup
    vault = Vault(server, (out / "signer-token").read_text().strip())
    body = (
        {"type": "ecdsa-p256", "input": "aGVsbG8=", "data": {"x": "y"}} if method != "GET" else None
    )
    assert vault.status(method, path, body) == 403


def test_setup_script_approle_and_kubernetes_roles(bao: BaoServer, vault_setup: Path) -> None:
    server, out = bao, vault_setup
    role_id = (out / "approle" / "role_id").read_text().strip()
    secret_id = (out / "approle" / "secret_id").read_text().strip()
    login = server.api("POST", "auth/approle/login", {"role_id": role_id, "secret_id": secret_id})
    assert login["auth"]["policies"] == ["svidgate-signer"]
    role = server.api("GET", "auth/kubernetes/role/svidgate-signer")["data"]
    assert role["bound_service_account_names"] == ["svidgate"]
    assert role["bound_service_account_namespaces"] == ["svidgate"]
    assert role["token_policies"] == ["svidgate-signer"]
    config = server.api("GET", "auth/kubernetes/config")["data"]
    assert config["kubernetes_ca_cert"].startswith("-----BEGIN CERTIFICATE-----")


PREREQUISITES = [
    ({"PATH": "/usr/bin:/bin", "VAULT_CLI": ""}, "neither bao nor vault is on PATH"),
    ({"VAULT_CLI": "vault-not-installed"}, "VAULT_CLI=vault-not-installed is not on PATH"),
    ({"BAO_ADDR": ""}, "set VAULT_ADDR (or BAO_ADDR)"),
    ({"BAO_TOKEN": "not-a-token"}, "cannot reach the server or the token is not valid"),
    ({"KUBERNETES_CA_CERT": ""}, "KUBERNETES_CA_CERT is required for Kubernetes auth"),
    ({"KUBERNETES_CA_CERT": "/nonexistent/ca.pem"}, "is not a readable file"),
    ({"KUBERNETES_CA_CERT": "{tmp}/not-pem"}, "holds no PEM certificate"),
    ({"KUBERNETES_HOST": "http://kubernetes:6443"}, "must be an https:// URL"),
    ({"TOKEN_FILE": "/nonexistent/signer-token"}, "its directory does not exist"),
]


@pytest.mark.parametrize(("change", "message"), PREREQUISITES)
def test_setup_script_checks_prerequisites_before_changing_anything(
    bao: BaoServer, pki: Pki, tmp_path: Path, change: dict[str, str], message: str
) -> None:
    """A missing CLI, address, token or Kubernetes setting stops the script with one line
    naming it, before it writes anything (the policy it would write first is unchanged)."""
    assert shutil.which("bao", path="/usr/bin:/bin") is None
    assert shutil.which("vault", path="/usr/bin:/bin") is None
    (tmp_path / "ca.pem").write_bytes(pki.bundle().read_bytes())
    (tmp_path / "not-pem").write_text("not a certificate\n")
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "VAULT_CLI": "bao",
        "BAO_ADDR": bao.address,
        "BAO_TOKEN": bao.root_token,
        "KUBERNETES_CA_CERT": str(tmp_path / "ca.pem"),
    }
    env.update({k: v.format(tmp=tmp_path) for k, v in change.items()})
    marker = '# marker: setup.sh must not have run\npath "marker/*" { capabilities = ["read"] }\n'
    bao.api("PUT", "sys/policies/acl/svidgate-signer", {"policy": marker})
    try:
        done = subprocess.run(
            ["sh", str(SETUP)], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("svidgate vault setup: ")
        policy = bao.api("GET", "sys/policies/acl/svidgate-signer")["data"]["policy"]
        assert policy == marker
    finally:
        bao.setup_signer()


@pytest.mark.parametrize("source", ["vault-kv", "vault-transit"])
def test_real_signer_runs_with_the_setup_token(
    bao: BaoServer,
    vault_setup: Path,
    compose: dict[str, Any],
    tmp_path: Path,
    source: str,
    signer_process: Callable[..., SignerProcess],
) -> None:
    server, out = bao, vault_setup
    # the compose signer.yaml, pointed at this OpenBao and a local socket / token file
    cfg = yaml_docs(DEPLOY / "compose" / "signer.yaml")[0]
    cfg["listen"]["unix"] = "run/signer.sock"
    cfg["keys"]["source"] = source
    cfg["keys"]["vault"]["address"] = server.address
    cfg["keys"]["vault"]["auth"]["token_file"] = str(out / "signer-token")
    cfg["keys"]["vault"]["kv_path"] = "svidgate/signing-keys"
    (tmp_path / "run").mkdir()
    config = tmp_path / "signer.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = signer_process(config, tmp_path / "signer.log")
    proc.start_sync(timeout=30)
    try:
        socket_path = tmp_path / "run" / "signer.sock"
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            stub = signer_pb2_grpc.SignerStub(channel)  # type: ignore[no-untyped-call]
            jwks = json.loads(stub.GetJWKS(signer_pb2.GetJWKSRequest(), timeout=5).jwks_json)
            assert jwks["keys"]
            token = stub.Sign(
                signer_pb2.SignRequest(
                    subject="spiffe://example.org/ns/demo/sa/client", audience=["echo"]
                ),
                timeout=10,
            ).token
            verified = stub.Verify(
                signer_pb2.VerifyRequest(token=token, audience=["echo"]), timeout=10
            )
            assert verified.subject == "spiffe://example.org/ns/demo/sa/client"
        assert "permission denied" not in proc.log.read_text()
    finally:
        proc.stop(10)
