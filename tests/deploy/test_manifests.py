"""Deployment files, checked offline: docker-compose.yml against the Compose spec schema
(check-jsonschema's vendored copy), the Kubernetes manifests against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict) and the ServiceMonitor against the Prometheus Operator's CRD models,
plus the cross-references between them, the Dockerfile's install path, and the dashboard's shape."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, REPO

K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.29.0", None)  # the oldest still common, and the newest the validator knows
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "specd.json"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def manifests() -> dict[str, dict]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    return {name: load_yaml(K8S / name) for name in kustomization["resources"]}


def by_kind(kind: str) -> dict:
    (found,) = [m for m in manifests().values() if m["kind"] == kind]
    return found


def serve_args(container: dict) -> dict[str, str]:
    return dict(a.lstrip("-").split("=", 1) for a in container["args"] if "=" in a)


# ---------------------------------------------------------------- docker-compose


def test_compose_validates_against_the_compose_spec():
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(REPO / "docker-compose.yml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validator_rejects_a_broken_file(tmp_path):
    compose = load_yaml(REPO / "docker-compose.yml")
    compose["services"]["specd"]["portz"] = ["8000:8000"]
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(compose))
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "portz" in result.stdout


def test_compose_wires_specd_prometheus_and_grafana():
    compose = load_yaml(REPO / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"specd", "prometheus", "grafana"}
    assert services["specd"]["build"]["context"] == "." and "8000:8000" in services["specd"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).is_dir(), volume
    # Prometheus scrapes the compose service; Grafana's datasource is the compose Prometheus.
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["specd:8000"]
    ds = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "specd.yml")["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_with_the_readme_command_and_runs_safely():
    import dockerfile  # Docker's own (BuildKit) parser

    commands = dockerfile.parse_file(str(REPO / "Dockerfile"))
    of = lambda cmd: [c for c in commands if c.cmd == cmd]  # noqa: E731
    runs = " ".join(" ".join(c.value) for c in of("RUN"))
    assert "make install" in runs and "make install" in (REPO / "README.md").read_text()
    assert "pip install" not in runs, "install through `make install`, not a second path"
    assert [c.value for c in of("FROM")] == [("${BASE}",)]
    assert any(c.value[0].startswith("BASE=python:") for c in of("ARG"))  # CPU default; CUDA via --build-arg
    assert "specd download-default" in runs  # the default model is baked in
    users = [c.value[0] for c in of("USER")]
    assert users and users[-1] not in ("root", "0")
    (check,) = of("HEALTHCHECK")
    assert check.value[0] == "CMD" and any("/health" in v for v in check.value)
    (cmd,) = of("CMD")
    assert cmd.value[0] == "serve" and "0.0.0.0" in cmd.value  # reachable from outside the container
    (entry,) = of("ENTRYPOINT")
    assert entry.value[0].endswith("/specd")
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifest_validates_strictly(name, version):
    import kubernetes_validate

    version = version or kubernetes_validate.latest_version()
    kubernetes_validate.validate(load_yaml(K8S / name), version, strict=True)


def test_k8s_validator_rejects_broken_manifests():
    import kubernetes_validate

    deployment = load_yaml(K8S / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"] = "sixty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)
    hpa = load_yaml(K8S / "hpa.yaml")
    hpa["spec"]["maxReplicaz"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, kubernetes_validate.latest_version(), strict=True)


def _crd_roundtrip(model_cls, data: dict) -> dict:
    # The generated models ignore unknown fields; dumping back and comparing catches them (strict).
    return model_cls.model_validate(data).model_dump(mode="json", by_alias=True, exclude_none=True)


def test_servicemonitor_validates_against_the_prometheus_operator_crd():
    from cloudcoil.models.prometheus_operator import v1

    sm = load_yaml(K8S / "servicemonitor.yaml")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    assert _crd_roundtrip(v1.ServiceMonitor, sm) == sm
    typo = json.loads(json.dumps(sm))
    typo["spec"]["endpoints"][0]["intervall"] = "15s"
    assert _crd_roundtrip(v1.ServiceMonitor, typo) != typo


def test_k8s_objects_refer_to_each_other():
    deployment, service = by_kind("Deployment"), by_kind("Service")
    hpa, pdb, monitor = by_kind("HorizontalPodAutoscaler"), by_kind("PodDisruptionBudget"), by_kind("ServiceMonitor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    assert service["metadata"]["name"] == "specd"  # the alert rules select job="specd"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_deployment_probes_resources_and_drain():
    deployment = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = serve_args(container)
    assert container["args"][0] == "serve" and args["host"] == "0.0.0.0"
    assert int(args["port"]) == container["ports"][0]["containerPort"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] in ("/health", "/version")
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and "memory" in container["resources"]["limits"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(args["drain-timeout"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_hpa_scales_on_the_waiting_queue_the_adapter_serves():
    hpa = by_kind("HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert metric["type"] == "Pods" and name == "specd_requests_waiting"
    rules = load_yaml(K8S / "prometheus-adapter-values.yaml")["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == name]
    assert re.match(r"[a-z_]+", rule["seriesQuery"]).group(0) == name
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(re.findall(r"<<\.\w+>>", rule["metricsQuery"]))


# ---------------------------------------------------------------- Grafana


def dashboard_panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def test_dashboard_json_is_what_the_generator_writes():
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import build_dashboard
    finally:
        sys.path.pop(0)
    assert DASHBOARD.read_text() == build_dashboard.render(), "run deploy/grafana/build_dashboard.py"


def test_every_panel_has_datasource_title_and_unit():
    panels = [p for p in dashboard_panels() if p["type"] != "row"]  # rows are layout, not panels
    assert len(panels) >= 20
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["title"].strip(), p
        assert p["datasource"]["type"] == "prometheus" and p["datasource"]["uid"], p["title"]
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for needed in ("acceptance rate", "acceptance length", "draft position", "drafted vs accepted", "speedup",
                   "batch size", "time to first token", "inter-token", "end-to-end", "throughput",
                   "running and waiting", "kv cache", "preemptions", "finish reasons", "errors by status code"):
        assert needed in titles, needed


def test_dashboard_rows_are_speculation_first():
    rows = [p["title"] for p in dashboard_panels() if p["type"] == "row"]
    assert rows[0] == "Speculation" and "Serving" in rows


def test_readme_documents_the_adapter_rule_and_scaling():
    readme = (REPO / "README.md").read_text()
    assert "Replicas are how specd scales past one machine" in readme
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "seriesQuery" in b]
    documented = yaml.safe_load(block)["rules"]["custom"]
    assert documented == load_yaml(K8S / "prometheus-adapter-values.yaml")["rules"]["custom"]


def test_every_deployed_command_line_parses():
    """The serve flags in the Deployment, docker-compose.yml and the Dockerfile's CMD are real flags."""
    import dockerfile

    from server.cli import build_parser

    (container,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    compose = load_yaml(REPO / "docker-compose.yml")["services"]["specd"]["command"]
    (cmd,) = [c for c in dockerfile.parse_file(str(REPO / "Dockerfile")) if c.cmd == "CMD"]
    for argv in (container["args"], compose, list(cmd.value)):
        args = build_parser().parse_args(argv)
        assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 8000, argv
        assert args.log_format == "json", argv
