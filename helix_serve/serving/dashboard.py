"""The Grafana dashboard over Helix's metrics, built with Grafana's own SDK (grafana-foundation-sdk).

Two sources, as Ray's dashboard Grafana sees them: the engine replicas' live state through Ray's metrics export
(`ray_helix_engine_*`, tagged with `pool`, `deployment` and `replica`), and the ingress's request metrics from its
`/metrics` route (`helix_*`: latencies, tokens, HTTP status, pool spreading; Prometheus needs a scrape job for
it, see the README). The committed JSON (configs/grafana/helix-dashboard.json) is this module's output:

    python -m helix_serve.serving.dashboard > configs/grafana/helix-dashboard.json
"""

from __future__ import annotations

import sys

from grafana_foundation_sdk.builders.dashboard import DatasourceVariable, Dashboard, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

UID = "helix-serve"
RATE = "[$__rate_interval]"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")


def _panel(title: str, unit: str, *queries: tuple[str, str], description: str = "") -> Panel:
    panel = Panel().title(title).unit(unit).datasource(DATASOURCE).description(description).height(8).span(12)
    for ref, (expr, legend) in zip("ABCDEFGH", queries):
        panel = panel.with_target(Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE))
    return panel


def _quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    keys = f"le{', ' + by if by else ''}"
    label = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({keys}) (rate({metric}_bucket{RATE})))", f"{label}p{round(q * 100)}")
            for q in (0.5, 0.9, 0.99)]


def ingress_panels() -> list[Panel]:
    return [
        _panel("Generated tokens/s", "short",
               (f"sum by (route) (rate(helix_generated_tokens_total{RATE}))", "{{route}}")),
        _panel("Time to first token", "s", *_quantiles("helix_time_to_first_token_seconds")),
        _panel("Inter-token latency", "s", *_quantiles("helix_inter_token_latency_seconds")),
        _panel("Request latency", "s", *_quantiles("helix_request_latency_seconds", "route")),
        _panel("HTTP requests/s by status", "reqps",
               (f"sum by (status) (rate(helix_http_requests_total{RATE}))", "{{status}}")),
        _panel("Open generations by pool (ingress queue)", "short",
               ("sum by (pool) (helix_pool_ongoing_requests)", "{{pool}}"),
               ("sum by (pool) (helix_pool_healthy)", "{{pool}} healthy")),
    ]


def engine_panels() -> list[Panel]:
    by_replica = "{{pool}} {{replica}}"
    return [
        _panel("Engine tokens/s per replica", "short",
               (f"sum by (pool, replica) (rate(ray_helix_engine_generated_tokens_total{RATE}))", by_replica)),
        _panel("Sequences running / waiting per replica", "short",
               ("sum by (pool, replica) (ray_helix_engine_running_sequences)", f"{by_replica} running"),
               ("sum by (pool, replica) (ray_helix_engine_waiting_sequences)", f"{by_replica} waiting")),
        _panel("Acceptance by proposer", "percentunit",
               (f"sum by (proposer) (rate(ray_helix_engine_accepted_draft_tokens_total{RATE})) / "
                f"sum by (proposer) (rate(ray_helix_engine_draft_tokens_total{RATE}))", "{{proposer}}"),
               description="Accepted / drafted tokens (vLLM's rate)"),
        _panel("K per verify step", "short",
               ("avg by (pool, replica) (ray_helix_engine_mean_k)", f"{by_replica} mean K"),
               *_quantiles("ray_helix_engine_speculative_k", "proposer")),
        _panel("KV cache blocks in use per replica", "percentunit",
               ('sum by (pool, replica) (ray_helix_engine_kv_blocks{state="used"}) / sum by (pool, replica) '
                '(ray_helix_engine_kv_blocks{state=~"used|free"})', by_replica)),
        _panel("Prefix-cache hit rate per replica", "percentunit",
               ("avg by (pool, replica) (ray_helix_engine_prefix_cache_hit_rate)", by_replica)),
        _panel("Engine steps/s per replica", "short",
               (f"sum by (pool, replica) (rate(ray_helix_engine_steps_total{RATE}))", by_replica)),
    ]


def build_dashboard() -> Dashboard:
    dashboard = (Dashboard("Helix").uid(UID).tags(["helix", "ray-serve", "llm"]).refresh("10s")
                 .time("now-30m", "now")
                 .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus")))
    dashboard = dashboard.with_row(Row("Requests (the ingress's /metrics)"))
    for panel in ingress_panels():
        dashboard = dashboard.with_panel(panel)
    dashboard = dashboard.with_row(Row("Engine replicas (Ray's metrics export)"))
    for panel in engine_panels():
        dashboard = dashboard.with_panel(panel)
    return dashboard


def dashboard_json() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build_dashboard().build()) + "\n"


if __name__ == "__main__":
    sys.stdout.write(dashboard_json())
