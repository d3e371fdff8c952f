"""deploy/k8s-spire: the overlay of deploy/k8s whose gateway takes its SVID and bundle from
SPIRE through the SPIFFE CSI driver. Its gateway.yaml passes the real config loader and asks
for the Workload API at the socket the CSI volume mounts; the patches name what the base has;
rendered (`kustomize build`, what `kubectl apply -k` applies), the gateway reads the Workload
API socket from the CSI volume and nothing of the base's SVID Secret or bundle ConfigMap is left.
(tests/test_deploy.py validates the render against the schemas and checkov.)"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from support.deploy_tools import render_kustomization
from svidgate.gateway.config import load_config

from svidgate.workload_api import socket_path

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / "deploy" / "k8s-spire"
BASE = ROOT / "deploy" / "k8s"


def doc(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded


def gateway_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = next(c for c in containers if c["name"] == "gateway")
    return found


def test_kustomization_builds_on_the_base_and_lists_every_file() -> None:
    kustomization = doc(OVERLAY / "kustomization.yaml")
    listed = {*kustomization["resources"], *(p["path"] for p in kustomization["patches"])}
    present = {p.name for p in OVERLAY.glob("*.yaml")} - {"kustomization.yaml"}
    assert "../k8s" in listed
    assert present == listed - {"../k8s"}


def test_gateway_config_uses_the_csi_mounted_workload_api(tmp_path: Path) -> None:
    text = doc(OVERLAY / "gateway-config.yaml")["data"]["gateway.yaml"]
    (tmp_path / "gateway.yaml").write_text(text, encoding="utf-8")
    cfg = load_config(tmp_path / "gateway.yaml")
    assert cfg.tls.source == "workload_api" and cfg.tls.cert is None
    assert all(td.source == "workload_api" for td in cfg.trust_domains.values())
    assert all(u.tls is None or u.tls.cert is None for u in cfg.upstreams.values())
    socket = socket_path(cfg.tls.workload_api.socket or "")
    patch = doc(OVERLAY / "deployment.yaml")
    volumes = {v["name"]: v for v in patch["spec"]["template"]["spec"]["volumes"]}
    mounts = [m for m in gateway_container(patch)["volumeMounts"] if "name" in m]
    csi = [m for m in mounts if volumes[m["name"]].get("csi", {}).get("driver") == "csi.spiffe.io"]
    assert len(csi) == 1 and csi[0]["readOnly"] is True
    assert PurePosixPath(csi[0]["mountPath"]) in PurePosixPath(str(socket)).parents


def test_patches_remove_only_what_the_base_has() -> None:
    base = next(
        d
        for d in yaml.safe_load_all((BASE / "deployment.yaml").read_text(encoding="utf-8"))
        if d and d["kind"] == "Deployment"
    )
    patch = doc(OVERLAY / "deployment.yaml")
    base_volumes = {v["name"] for v in base["spec"]["template"]["spec"]["volumes"]}
    base_mounts = {m["mountPath"] for m in gateway_container(base)["volumeMounts"]}
    for volume in patch["spec"]["template"]["spec"]["volumes"]:
        if volume.get("$patch") == "delete":
            assert volume["name"] in base_volumes
    for mount in gateway_container(patch)["volumeMounts"]:
        if mount.get("$patch") == "delete":
            assert mount["mountPath"] in base_mounts
    assert patch["metadata"]["name"] == base["metadata"]["name"]
    config = doc(OVERLAY / "gateway-config.yaml")
    assert config["metadata"]["name"] == doc(BASE / "configmap.yaml")["metadata"]["name"]


def test_rendered_overlay_mounts_the_socket_and_nothing_of_the_svid_files(tmp_path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(render_kustomization(OVERLAY)) if d]
    by_id = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deployment = by_id[("Deployment", "svidgate")]
    gateway = gateway_container(deployment)
    (tmp_path / "gateway.yaml").write_text(
        by_id[("ConfigMap", "svidgate-config")]["data"]["gateway.yaml"], encoding="utf-8"
    )
    cfg = load_config(tmp_path / "gateway.yaml")
    socket = PurePosixPath(str(socket_path(cfg.tls.workload_api.socket or "")))
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [
        m for m in gateway["volumeMounts"] if PurePosixPath(m["mountPath"]) in socket.parents
    ]
    assert volumes[mount["name"]] == {
        "name": mount["name"],
        "csi": {"driver": "csi.spiffe.io", "readOnly": True},
    }
    # what the patch deletes (the base's SVID Secret and bundle ConfigMap) is gone, mounts too
    patch = doc(OVERLAY / "deployment.yaml")
    deleted = [v["name"] for v in patch["spec"]["template"]["spec"]["volumes"] if "$patch" in v]
    unmounted = [m["mountPath"] for m in gateway_container(patch)["volumeMounts"] if "$patch" in m]
    assert deleted and not set(deleted) & set(volumes)
    assert unmounted and not set(unmounted) & {m["mountPath"] for m in gateway["volumeMounts"]}
    assert {m["name"] for m in gateway["volumeMounts"]} <= set(volumes)
    assert ("ClusterSPIFFEID", "svidgate-gateway") in by_id
