"""Prometheus exporter: maps the engine's plain `StepStats` onto `specd_*` metrics.

The engine never touches prometheus_client; it fills a StepStats per step and the server's engine
thread hands it to `PrometheusExporter.observe_step`. This module imports no torch.

Useful PromQL (the Grafana dashboard uses these):
  acceptance rate:         sum by (method) (rate(specd_spec_accepted_tokens_total[1m]))
                             / sum by (method) (rate(specd_spec_draft_tokens_total[1m]))
  mean acceptance length:  (sum by (method) (rate(specd_spec_accepted_tokens_total[1m]))
                             + sum by (method) (rate(specd_spec_verify_steps_total[1m])))
                             / sum by (method) (rate(specd_spec_verify_steps_total[1m]))
                           (tokens emitted per request-step, the bonus token included)
  acceptance by position:  rate(specd_spec_accepted_tokens_per_pos_total[1m])
                             / ignoring(position) group_left sum by (method, batch_size) (rate(specd_spec_drafts_total[1m]))
  live speedup:            specd_spec_speedup
  throughput (tok/s):      rate(specd_generation_tokens_total[1m])
  TTFT p99:                histogram_quantile(0.99, rate(specd_time_to_first_token_seconds_bucket[5m]))
  queue saturation:        specd_requests_waiting
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.types import StepStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_size_bucket(batch_size: int) -> str:
    """The batch-size label used by every speculation metric: 1, 2-4, 5-8, 9-16, 17+."""
    for upper, label in ((1, "1"), (4, "2-4"), (8, "5-8"), (16, "9-16")):
        if batch_size <= upper:
            return label
    return "17+"


class PrometheusExporter:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._define_serving_metrics()
        self._last_itl_time: float | None = None

    def _define_serving_metrics(self) -> None:
        r = self.registry
        self.ttft = Histogram("specd_time_to_first_token_seconds", "Time from arrival to the first output token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("specd_inter_token_latency_seconds",
                                     "Mean time between output tokens of a finished request",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("specd_e2e_request_latency_seconds", "Arrival to finish",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("specd_request_queue_time_seconds", "Arrival to first scheduled",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("specd_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("specd_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("specd_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r)
        self.prompt_tokens = Counter("specd_prompt_tokens", "Prompt tokens computed (prefill)", registry=r)
        self.generation_tokens = Counter("specd_generation_tokens", "Output tokens generated", registry=r)
        self.finished = Counter("specd_request_finished", "Finished requests by reason",
                                ["finish_reason"], registry=r)
        self.http_errors = Counter("specd_http_errors", "HTTP error responses by status code",
                                   ["status_code"], registry=r)
        self.preemptions = Counter("specd_preemptions", "Requests preempted for lack of KV cache", registry=r)
        self.step_time = Histogram("specd_step_duration_seconds", "Engine step wall time",
                                   buckets=STEP_BUCKETS, registry=r)
        self.batch_size = Histogram("specd_batch_size", "Requests per engine step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.steps = Counter("specd_steps", "Engine steps", registry=r)
        self._define_spec_metrics()

    def _define_spec_metrics(self) -> None:
        r, labels = self.registry, ["method", "batch_size"]
        self.spec_steps = Counter("specd_spec_verify_steps", "Request-steps that emitted tokens, by method",
                                  labels, registry=r)
        self.spec_drafts = Counter("specd_spec_drafts", "Request-steps that verified at least one draft",
                                   labels, registry=r)
        self.spec_draft_tokens = Counter("specd_spec_draft_tokens", "Draft tokens verified", labels, registry=r)
        self.spec_accepted = Counter("specd_spec_accepted_tokens", "Draft tokens accepted", labels, registry=r)
        self.spec_accepted_pos = Counter("specd_spec_accepted_tokens_per_pos",
                                         "Accepted drafts by position in the draft (1 = first)",
                                         labels + ["position"], registry=r)
        self.spec_acceptance_length = Histogram(
            "specd_spec_request_acceptance_length", "Per finished request: tokens emitted per step",
            ["method"], buckets=(1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0), registry=r)
        self.spec_speedup = Gauge("specd_spec_speedup",
                                  "Tokens/s of the last decode step over plain decoding at that batch size",
                                  labels, registry=r)

    def observe_step(self, stats: StepStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self._observe_finished(stats)
        if stats.batch_size == 0:
            return  # an idle step that only reported aborts
        self.steps.inc()
        self.step_time.observe(stats.step_time)
        self.batch_size.observe(stats.batch_size)
        self.prompt_tokens.inc(stats.num_prefill_tokens)
        self.generation_tokens.inc(stats.num_generated_tokens)
        if stats.num_preemptions:
            self.preemptions.inc(stats.num_preemptions)
        self._observe_spec(stats)

    def _observe_spec(self, stats: StepStats) -> None:
        bucket = batch_size_bucket(stats.batch_size)
        for rec in stats.spec:
            self.spec_steps.labels(rec.method, bucket).inc()
            if rec.num_draft == 0:
                continue
            self.spec_drafts.labels(rec.method, bucket).inc()
            self.spec_draft_tokens.labels(rec.method, bucket).inc(rec.num_draft)
            self.spec_accepted.labels(rec.method, bucket).inc(rec.num_accepted)
            for position in range(1, rec.num_accepted + 1):
                self.spec_accepted_pos.labels(rec.method, bucket, str(position)).inc()
        if stats.speedup is not None and stats.spec:
            methods = {rec.method for rec in stats.spec}
            self.spec_speedup.labels(methods.pop() if len(methods) == 1 else "mixed", bucket).set(stats.speedup)

    def _observe_finished(self, stats: StepStats) -> None:
        for f in stats.finished:
            self.finished.labels(finish_reason=f.finish_reason.value).inc()
            self.e2e.observe(f.e2e_latency)
            self.queue_time.observe(f.queue_time)
            if f.spec.steps:
                self.spec_acceptance_length.labels(f.method).observe(f.spec.mean_acceptance_length)
            if f.ttft is not None:
                self.ttft.observe(f.ttft)
                if f.num_output_tokens > 1:
                    self.inter_token.observe((f.e2e_latency - f.ttft) / (f.num_output_tokens - 1))

    def count_http_error(self, status_code: int) -> None:
        self.http_errors.labels(status_code=str(status_code)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
