"""The Grafana dashboard: the committed JSON is what `helix_serve.serving.dashboard` builds with Grafana's SDK,
the SDK reads it back as a dashboard, and every metric a panel queries is one that Helix exports."""

import json
import re
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard
from ray.util import metrics as ray_metrics

from helix_serve.serving.dashboard import dashboard_json
from helix_serve.serving.metrics import EngineMetrics, HelixMetrics

COMMITTED = Path(__file__).resolve().parents[1] / "configs" / "grafana" / "helix-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> set[str]:
    """Series names of the ingress's registry (/metrics) and of the engine metrics in Ray's export (`ray_`)."""
    names = {f"{family.name}{suffix}" for family in HelixMetrics().registry.collect()
             for suffix in SUFFIXES[family.type]}
    for metric in vars(EngineMetrics("pool", 8)).values():
        kind = next(k for k, cls in (("histogram", ray_metrics.Histogram), ("counter", ray_metrics.Counter),
                                     ("gauge", ray_metrics.Gauge)) if isinstance(metric, cls))
        names |= {f"ray_{metric._name}{suffix}" for suffix in SUFFIXES[kind]}
    return names


def queries(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_committed_dashboard_is_what_the_module_builds():
    assert COMMITTED.read_text() == dashboard_json(), "run: python -m helix_serve.serving.dashboard > " + str(COMMITTED)


def test_grafanas_sdk_reads_it_back_and_every_panel_queries_prometheus():
    raw = json.loads(COMMITTED.read_text())
    assert json.loads(JSONEncoder().encode(Dashboard.from_json(raw))) == raw
    panels = [p for p in raw["panels"] if p["type"] == "timeseries"]
    assert len(panels) >= 12 and raw["uid"] == "helix-serve"
    for panel in panels:
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs) and all(refs)
        assert panel["datasource"]["uid"] == "${datasource}"


def test_every_metric_the_dashboard_queries_is_exported():
    referenced = {name for expr in queries(json.loads(COMMITTED.read_text()))
                  for name in re.findall(r"\b(?:ray_)?helix_[a-z_]+", expr)}
    exported = exported_series()
    assert referenced and referenced <= exported, sorted(referenced - exported)
    # and it shows every engine metric (Ray's export), under some suffix
    def base(name: str) -> str:
        return re.sub(r"_(total|bucket|sum|count)$", "", name)

    assert {base(n) for n in exported if n.startswith("ray_")} <= {base(n) for n in referenced}
