"""The docker/ files parse and agree with each other and with the metric names we export.

There is no Docker engine in CI: these checks are what can be verified without one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

DOCKER = Path(__file__).resolve().parent.parent / "docker"
yaml = pytest.importorskip("yaml")


def load_yaml(name: str) -> Any:
    return yaml.safe_load((DOCKER / name).read_text())


def test_every_yaml_and_json_file_parses() -> None:
    files = sorted(DOCKER.rglob("*.y*ml"))
    assert {p.name for p in files} >= {
        "compose.yaml",
        "prometheus.yml",
        "prometheus.yaml",
        "ingestd.yaml",
    }
    for p in files:
        assert isinstance(yaml.safe_load(p.read_text()), dict), p
    for p in DOCKER.rglob("*.json"):
        assert isinstance(json.loads(p.read_text()), dict), p


def test_dockerfile() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f == "python:3.11-slim" for f in froms)
    assert "build-essential" in text  # a C compiler for the Cython extensions
    assert re.search(r"pip install \.", text)
    assert re.search(r'^ENTRYPOINT \["ingestd"\]', text, re.M)
    assert re.search(r'^CMD \["serve"\]', text, re.M)
    assert "INGESTD_SERVER__HTTP_LISTEN=0.0.0.0:8080" in text
    assert re.search(r"^USER ingestd", text, re.M)  # not root
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and "**/*.so" in ignore
    # Cython output generated on the host (ext/ingestd/*.c) must not reach the image build.
    assert "ext/**/*.c" in ignore


def test_compose_wiring() -> None:
    compose = load_yaml("compose.yaml")
    services = compose["services"]
    assert set(services) == {"db", "ingestd", "prometheus", "grafana"}
    ing = services["ingestd"]
    assert ing["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / ing["build"]["context"] / ing["build"]["dockerfile"]).is_file()
    env = ing["environment"]
    db = services["db"]["environment"]
    dsn = env["INGESTD_DATABASE__DSN"]
    assert dsn == (
        f"postgresql://{db['POSTGRES_USER']}:{db['POSTGRES_PASSWORD']}@db:5432/{db['POSTGRES_DB']}"
    )
    assert ing["depends_on"]["db"]["condition"] == "service_healthy"
    assert "healthcheck" in services["db"]
    http_port = env["INGESTD_SERVER__HTTP_LISTEN"].rsplit(":", 1)[1]
    # Every bind-mounted host path exists (relative to docker/).
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), f"{name}: {src}"
        for named in [v.split(":")[0] for v in svc.get("volumes", []) if not v.startswith(".")]:
            assert named in compose["volumes"], named
    # The config file mounted into ingestd is a valid ingestd configuration
    # (environment overrides applied as in the container).
    cfg_src = next(v.split(":")[0] for v in ing["volumes"] if v.endswith(".toml:ro"))
    from ingestd.config import load_config

    cfg = load_config(str(DOCKER / cfg_src), env={k: str(v) for k, v in env.items()})
    assert cfg.database.dsn == dsn
    assert cfg.server.http_listen == f"0.0.0.0:{http_port}"
    assert "--config" in ing["command"] and ing["command"][0] == "serve"

    # Prometheus scrapes the ingestd service on its HTTP port.
    prom = load_yaml("prometheus.yml")
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    targets = [t for sc in jobs["ingestd"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"ingestd:{http_port}"]
    assert jobs["ingestd"]["metrics_path"] == "/metrics"

    # Grafana: the datasource points at the prometheus service; the dashboard
    # provider's path is where compose mounts the dashboards.
    graf = services["grafana"]
    ds = load_yaml("grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    provider = load_yaml("grafana/provisioning/dashboards/ingestd.yaml")["providers"][0]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in graf["volumes"] if v.startswith(".")}
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    dash = json.loads((DOCKER / "grafana/dashboards/ingestd.json").read_text())
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == ds["uid"]


def _exported_metric_names() -> tuple[set[str], set[str]]:
    """(family names, sample names) our registry exposes (fake broker and engine: all families)."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from ingestd.metrics import LoopLagMonitor, build_registry
    from test_metrics import FakeEngine, fake_broker, fake_hooks, fake_upstreams

    registry, collector = build_registry(fake_broker(), FakeEngine(), LoopLagMonitor())
    collector.upstreams = fake_upstreams()
    collector.hooks = fake_hooks()
    families, samples = set(), set()
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        families.add(fam.name)
        samples.update(s.name for s in fam.samples)
    return families, samples


def test_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads((DOCKER / "grafana/dashboards/ingestd.json").read_text())
    assert dash["uid"] == "ingestd"
    exprs = [t["expr"] for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]
    assert exprs
    used = set()
    for e in exprs:
        used.update(re.findall(r"\b((?:ingestd|process|python)_[a-z_]+)\b", e))
    families, samples = _exported_metric_names()
    assert used - (families | samples) == set()
    # Every ingestd_ family appears somewhere on the dashboard.
    ours = {f for f in families if f.startswith("ingestd_")}
    covered = {f for f in ours if any(u == f or u.startswith(f + "_") for u in used)}
    assert ours - covered == set()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
