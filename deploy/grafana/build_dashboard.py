"""Writes deploy/grafana/dashboards/specd.json, the provisioned specd dashboard.

The panels are declared here, compactly; the JSON is generated and committed (Grafana provisions
the JSON, nothing runs this at deploy time). Edit this file, then run

    .venv/bin/python deploy/grafana/build_dashboard.py

tests/deploy checks that the committed JSON is what this script writes, that every panel has a
datasource, a title and a unit, that every metric it names is exported by a live specd, and that
every query returns data from a real Prometheus scraping specd under speculative load.

Queries use `$F` for the instance filter (every selector gets it) and Grafana's `$__rate_interval`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "specd.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
FILTER = 'instance=~"$instance"'
RI = "$__rate_interval"
TOK_S = "suffix: tok/s"
TIMES = "suffix:×"
TOK_STEP = "suffix: tok/step"


@dataclass
class Panel:
    title: str
    unit: str
    targets: list[tuple[str, str]]  # (PromQL with $F, legend)
    description: str = ""
    kind: str = "timeseries"
    width: int = 8
    height: int = 8
    options: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)


def sel(metric: str, *matchers: str) -> str:
    return f"{metric}{{{', '.join(('$F',) + matchers)}}}"


def rate(metric: str, *matchers: str) -> str:
    return f"rate({sel(metric, *matchers)}[{RI}])"


def ratio_by(by: str, num: str, den: str) -> str:
    return f"sum by ({by}) ({rate(num)})\n  / sum by ({by}) ({rate(den)})"


def quantiles(metric: str, by: str = "", qs=(0.5, 0.99)) -> list[tuple[str, str]]:
    group = f"{by}, le" if by else "le"
    prefix = "{{" + by + "}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) ({rate(metric + '_bucket')}))", f"{prefix}p{round(q * 100)}")
            for q in qs]


SPEED_THRESHOLDS = {"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "orange", "value": 0.95},
                                                   {"color": "green", "value": 1.05}]}

SPECULATION = [
    Panel("Live speedup over plain decoding", TIMES,
          [(f"avg by (method) ({sel('specd_spec_speedup')})", "{{method}}")],
          "specd_spec_speedup: tokens/s of the latest decode step over what plain decoding gives at that batch "
          "size (calibrated at start-up). Below 1 speculation costs more than it saves.",
          kind="stat", width=6, defaults={"thresholds": SPEED_THRESHOLDS, "decimals": 2}),
    Panel("Speedup by method", TIMES, [(f"avg by (method) ({sel('specd_spec_speedup')})", "{{method}}")],
          "The live speedup gauge over time, averaged over replicas and batch-size buckets.", width=9,
          defaults={"custom": {"thresholdsStyle": {"mode": "line"}}, "thresholds": SPEED_THRESHOLDS}),
    Panel("Speedup by batch size", TIMES,
          [(f"avg by (batch_size) ({sel('specd_spec_speedup')})", "batch {{batch_size}}")],
          "Speculation pays most at small batches, where a decode step leaves compute idle.", width=9),
    Panel("Acceptance rate by method", "percentunit",
          [(ratio_by("method", "specd_spec_accepted_tokens_total", "specd_spec_draft_tokens_total"), "{{method}}")],
          "Accepted draft tokens / verified draft tokens.", defaults={"min": 0, "max": 1}),
    Panel("Mean acceptance length by method", TOK_STEP,
          [(f"(sum by (method) ({rate('specd_spec_accepted_tokens_total')})\n"
            f"  + sum by (method) ({rate('specd_spec_verify_steps_total')}))\n"
            f"  / sum by (method) ({rate('specd_spec_verify_steps_total')})", "{{method}}")],
          "Tokens emitted per request per step, the bonus token included (1 = plain decoding)."),
    Panel("Acceptance by draft position", "percentunit",
          [(f"sum by (method, position) ({rate('specd_spec_accepted_tokens_per_pos_total')})\n"
            f"  / ignoring (position) group_left sum by (method) ({rate('specd_spec_drafts_total')})",
            "{{method}} pos {{position}}")],
          "Share of drafting request-steps whose draft was accepted up to at least this position.",
          defaults={"min": 0, "max": 1}),
    Panel("Drafted vs accepted tokens/s", TOK_S,
          [(f"sum by (method) ({rate('specd_spec_draft_tokens_total')})", "{{method}} drafted"),
           (f"sum by (method) ({rate('specd_spec_accepted_tokens_total')})", "{{method}} accepted")],
          "Verification work (drafted) against what it bought (accepted)."),
    Panel("Acceptance rate by batch size", "percentunit",
          [(ratio_by("batch_size", "specd_spec_accepted_tokens_total", "specd_spec_draft_tokens_total"),
            "batch {{batch_size}}")],
          "The cost controller drafts less at large batches; acceptance should not depend on batch size.",
          defaults={"min": 0, "max": 1}),
    Panel("Per-request acceptance length p10 / p50 / p90", TOK_STEP,
          quantiles("specd_spec_request_acceptance_length", by="method", qs=(0.1, 0.5, 0.9)),
          "Distribution over finished requests of their mean tokens per step."),
    Panel("Per-request acceptance length distribution", "short",
          [(f"sum by (le) (increase({sel('specd_spec_request_acceptance_length_bucket')}[{RI}]))", "{{le}}")],
          "Finished requests per acceptance-length bucket (heatmap).", kind="heatmap", width=24,
          options={"calculate": False, "yAxis": {"unit": TOK_STEP}, "cellGap": 1,
                   "color": {"mode": "scheme", "scheme": "Greens", "exponent": 0.5}}),
]

SERVING = [
    Panel("Time to first token", "s", quantiles("specd_time_to_first_token_seconds"), "Arrival to the first token."),
    Panel("Inter-token latency", "s", quantiles("specd_inter_token_latency_seconds"),
          "Per finished request: (e2e - TTFT) / (output tokens - 1)."),
    Panel("End-to-end latency", "s", quantiles("specd_e2e_request_latency_seconds"), "Arrival to finish."),
    Panel("Request throughput", "reqps", [(f"sum ({rate('specd_request_finished_total')})", "finished")],
          "Finished engine requests per second (each choice of n counts)."),
    Panel("Token throughput", TOK_S,
          [(f"sum ({rate('specd_generation_tokens_total')})", "generated"),
           (f"sum ({rate('specd_prompt_tokens_total')})", "prompt (prefill)")],
          "Output tokens generated and prompt tokens prefilled per second."),
    Panel("Running and waiting requests", "short",
          [(f"sum by (instance) ({sel('specd_requests_running')})", "running {{instance}}"),
           (f"sum by (instance) ({sel('specd_requests_waiting')})", "waiting {{instance}}")],
          "Waiting requests are what the HorizontalPodAutoscaler scales on."),
    Panel("KV cache usage", "percentunit", [(f"max by (instance) ({sel('specd_kv_cache_usage_ratio')})", "{{instance}}")],
          "Fraction of KV cache blocks in use; near 1 the newest requests get preempted.",
          defaults={"min": 0, "max": 1}),
    Panel("Preemptions", "suffix:/s", [(f"sum by (instance) ({rate('specd_preemptions_total')})", "{{instance}}")],
          "Requests preempted for lack of KV cache (recomputed later)."),
    Panel("Queue time", "s", quantiles("specd_request_queue_time_seconds"), "Arrival to first scheduled."),
    Panel("Finish reasons", "reqps",
          [(f"sum by (finish_reason) ({rate('specd_request_finished_total')})", "{{finish_reason}}")],
          "stop / length / abort (client gone) / error."),
    Panel("Errors by status code", "reqps",
          [(f"sum by (status_code) ({rate('specd_http_errors_total')})", "{{status_code}}")],
          "HTTP error responses: 4xx bad input, 429 queue full, 503 loading or draining, 500 engine error."),
    Panel("Engine step time", "s", quantiles("specd_step_duration_seconds"), "Wall time of one engine step."),
    Panel("Batch size", "short",
          [(f"sum ({rate('specd_batch_size_sum')})\n  / sum ({rate('specd_batch_size_count')})", "mean"),
           (f"sum ({rate('specd_steps_total')})", "steps/s")],
          "Mean requests per engine step, and engine steps per second.", width=24),
]


def _panel_json(p: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = [{"datasource": DATASOURCE, "expr": expr.replace("$F", FILTER), "legendFormat": legend,
                "refId": chr(ord("A") + i), "range": True, "format": "heatmap" if p.kind == "heatmap" else "time_series"}
               for i, (expr, legend) in enumerate(p.targets)]
    out = {"id": panel_id, "type": p.kind, "title": p.title, "description": p.description, "datasource": DATASOURCE,
           "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
           "fieldConfig": {"defaults": {"unit": p.unit, **p.defaults}, "overrides": []}, "targets": targets}
    if p.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    elif p.kind == "stat":
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background", "textMode": "auto"}
    out["options"] = {**out.get("options", {}), **p.options}
    return out


def _layout(rows: list[tuple[str, list[Panel]]]) -> list[dict]:
    panels, y, next_id = [], 0, 1
    for title, members in rows:
        panels.append({"id": next_id, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id, y, x, row_h = next_id + 1, y + 1, 0, 0
        for p in members:
            if x + p.width > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(_panel_json(p, next_id, x, y))
            next_id, x, row_h = next_id + 1, x + p.width, max(row_h, p.height)
        y += row_h
    return panels


def _templating() -> dict:
    return {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1},
        {"name": "instance", "label": "Instance", "type": "query", "datasource": DATASOURCE,
         "query": {"query": "label_values(specd_requests_running, instance)", "refId": "instance"},
         "definition": "label_values(specd_requests_running, instance)", "refresh": 2, "multi": True,
         "includeAll": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "sort": 1},
    ]}


def build() -> dict:
    return {
        "uid": "specd", "title": "specd: speculative decoding", "tags": ["specd", "llm", "speculative-decoding"],
        "description": "Does speculation pay? Acceptance and live speedup by method and batch size, then serving.",
        "editable": True, "graphTooltip": 1, "refresh": "10s", "schemaVersion": 39, "version": 1,
        "time": {"from": "now-30m", "to": "now"}, "timezone": "browser",
        "annotations": {"list": []}, "links": [],
        "templating": _templating(),
        "panels": _layout([("Speculation", SPECULATION), ("Serving", SERVING)]),
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(OUT)
