"""A real Prometheus scrapes a real specd (the default model, `--spec ngram`) while a short load
with speculation runs; then every PromQL expression of the Grafana dashboard, the recording and
alert rules and the Prometheus-adapter rule is evaluated through Prometheus' HTTP API.

Prometheus is Debian's `prometheus` package (installed by the `prometheus_bins` fixture when
missing). One specd and one Prometheus serve the whole module (about 30 s on 2 cores).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import DEPLOY
from tests.e2e.conftest import free_port

PROM_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "specd.json"
ADAPTER = DEPLOY / "k8s" / "prometheus-adapter-values.yaml"
RATE_WINDOW = "1m"  # what Grafana's $__rate_interval becomes here
# Text the model copies: prompt lookup (ngram) drafts get accepted, so every speculation series exists.
PROMPT = ("Repeat this list exactly, twice: apple, banana, cherry, date, elderberry, fig, grape, "
          "honeydew, kiwi, lemon, mango, nectarine.")
NUM_CLIENTS, NUM_ROUNDS, MAX_TOKENS = 4, 3, 48


# ---------------------------------------------------------------- fixtures


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log_path: Path):
        self.url, self.proc, self.log_path = url, proc, log_path
        self.eval_time: float | None = None

    def query(self, expr: str) -> list[dict]:
        params = {"query": expr}
        if self.eval_time is not None:
            params["time"] = f"{self.eval_time:.3f}"
        resp = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=30)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", f"{expr}\n-> {resp.status_code} {body}"
        return body["data"]["result"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_config(tmp: Path, target: str) -> Path:
    """deploy/prometheus/prometheus.yml, pointed at the test server and sped up to 1 s."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def specd(start_server, default_model_dir):
    return start_server("--spec", "ngram", "--no-spec-adaptive", "--max-num-seqs", "8", model_dir=default_model_dir)


@pytest.fixture(scope="module")
def prometheus(prometheus_bins, specd, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    config = write_config(tmp, specd.url.removeprefix("http://"))
    port = free_port()
    log_path = tmp / "prometheus.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([prometheus_bins["prometheus"], f"--config.file={config}",
                                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{prom.log()}"
            try:
                if httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{prom.log()}"
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_load(url: str, rounds: int) -> None:
    """NUM_CLIENTS concurrent chat clients, `rounds` requests each, plus some 4xx errors."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS, "temperature": 0}

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as http:
            for _ in range(rounds):
                stream = i % 2 == 0
                resp = http.post(f"{url}/v1/chat/completions", json={**body, "stream": stream})
                assert resp.status_code == 200, resp.text
            assert http.post(f"{url}/v1/completions", json={"prompt": "", "max_tokens": 4}).status_code == 400
            assert http.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404

    with ThreadPoolExecutor(NUM_CLIENTS) as pool:
        list(pool.map(client, range(NUM_CLIENTS)))


def wait_for(prometheus: Prometheus, expr: str, done, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done(prometheus.query(expr)):
        assert time.monotonic() < deadline, f"Prometheus {what}:\n{prometheus.log()}"
        time.sleep(0.5)


def accepted_total(specd) -> float:
    final = {f.name: f for f in text_string_to_metric_families(specd.metrics())}
    return sum(s.value for s in final["specd_spec_accepted_tokens"].samples if s.name.endswith("_total"))


@pytest.fixture(scope="module")
def loaded(prometheus, specd):
    """Run the load while Prometheus scrapes, then wait until it has scraped the final counters
    and evaluated the rules after them; queries are then evaluated at that instant.

    rate() counts only increases after a series' first sample, and the speculation series appear
    with the first draft. So one round runs first and Prometheus must have scraped its series
    before the rest of the load (Prometheus applies new scrape targets only every 5 s, and on a
    quiet machine the whole load takes less than that)."""
    wait_for(prometheus, 'up{job="specd"}', bool, "never scraped specd")
    run_load(specd.url, 1)
    # the per-request histogram's series appears when round 1's requests finish, after its drafts: a
    # fast engine ran the other rounds within one scrape interval of that, leaving rate() nothing
    for series in ("specd_spec_draft_tokens_total", "specd_spec_request_acceptance_length_count"):
        wait_for(prometheus, series, bool, f"did not scrape the first round's {series}")
    run_load(specd.url, NUM_ROUNDS - 1)
    accepted = accepted_total(specd)
    assert accepted > 0, "the load must accept drafts, or the speculation panels have nothing to show"
    wait_for(prometheus, "sum(specd_spec_accepted_tokens_total)",
             lambda r: r and float(r[0]["value"][1]) == accepted, "did not catch up")
    wait_for(prometheus, "count(specd:spec_acceptance_rate:rate5m)", bool, "did not evaluate the rules")
    time.sleep(1.5)  # one more rule evaluation over the final samples
    prometheus.eval_time = time.time()
    return prometheus


# ---------------------------------------------------------------- expressions


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(row, panel title, expr) for every query of the dashboard, in order."""
    out, row = [], ""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        out += [(row, panel["title"], t["expr"]) for t in panel["targets"]]
    return out


def grafana_to_promql(expr: str) -> str:
    """Substitute the dashboard's variables the way Grafana would with 'All' instances selected."""
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$instance", ".*")


def rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def finite_values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


# ---------------------------------------------------------------- promtool


def test_promtool_check_config(prometheus_bins):
    out = subprocess.run([prometheus_bins["promtool"], "check", "config", str(PROM_DIR / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules(prometheus_bins):
    out = subprocess.run([prometheus_bins["promtool"], "check", "rules", str(PROM_DIR / "alerts.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_alert_unit_tests(prometheus_bins):
    out = subprocess.run([prometheus_bins["promtool"], "test", "rules", "alerts_test.yml"], cwd=PROM_DIR,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- live queries


def test_dashboard_names_only_metrics_the_server_exports(loaded, specd):
    exported = set()
    for family in text_string_to_metric_families(specd.metrics()):
        exported |= {s.name for s in family.samples}
    named = {m for _, _, expr in dashboard_targets() for m in re.findall(r"\bspecd_[a-z0-9_]+", expr)}
    template = json.loads(DASHBOARD.read_text())["templating"]["list"]
    named |= {m for v in template for m in re.findall(r"\bspecd_[a-z0-9_]+", json.dumps(v.get("query", "")))}
    assert named and not named - exported, f"not exported by /metrics: {sorted(named - exported)}"
    for rule in rules():  # the rules' inputs too (their outputs are specd:... recording names)
        assert not set(re.findall(r"\bspecd_[a-z0-9_]+", rule["expr"])) - exported, rule


@pytest.mark.parametrize("row,title,expr", [pytest.param(*t, id=f"{t[1]}#{i}") for i, t in enumerate(dashboard_targets())])
def test_dashboard_query_returns_data(loaded, row, title, expr):
    result = loaded.query(grafana_to_promql(expr))
    assert result, f"[{row}] {title}: no data for\n{expr}"
    if row == "Speculation":
        values = finite_values(result)
        assert values, f"[{row}] {title}: only NaN/Inf for\n{expr}\n{result}"


def test_speculation_panels_show_real_acceptance(loaded):
    rate = loaded.query("sum(rate(specd_spec_accepted_tokens_total[1m])) / sum(rate(specd_spec_draft_tokens_total[1m]))")
    assert 0 < float(rate[0]["value"][1]) <= 1
    by_pos = {r["metric"]["position"]: float(r["value"][1]) for r in loaded.query(
        "sum by (position) (rate(specd_spec_accepted_tokens_per_pos_total[1m]))")}
    assert by_pos["1"] >= max(by_pos.values()) - 1e-9  # accepting position p needs every position before it


def test_recording_rules_return_data(loaded):
    for rule in (r for r in rules() if "record" in r):
        result = loaded.query(rule["expr"])
        assert result, f"{rule['record']}: no data"
        if "specd_spec_" in rule["expr"]:
            assert finite_values(result), f"{rule['record']}: {result}"


def test_alert_expressions_evaluate(loaded):
    alerts = [r for r in rules() if "alert" in r]
    assert {a["alert"] for a in alerts} >= {"SpecdSpeculationSlowerThanPlain", "SpecdAcceptanceCollapse",
                                            "SpecdQueueFull", "SpecdHigh5xxRate", "SpecdDown"}
    for alert in alerts:
        result = loaded.query(alert["expr"])
        if alert["alert"] == "SpecdDown":
            assert result == [], "specd is up: the down alert must not match"
        if alert["alert"] in ("SpecdQueueFull", "SpecdHigh5xxRate"):
            assert result == [], f"{alert['alert']} matched a healthy server: {result}"


def test_prometheus_loaded_and_evaluated_every_rule(loaded):
    groups = httpx.get(f"{loaded.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    evaluated = {r["name"]: r for g in groups for r in g["rules"]}
    expected = {r.get("record") or r.get("alert") for r in rules()}
    assert set(evaluated) == expected
    for name, rule in evaluated.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)
    targets = httpx.get(f"{loaded.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"] and targets[0]["labels"]["job"] == "specd"


def test_prometheus_adapter_rule_query_returns_data(loaded):
    (rule,) = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    series = re.match(r"[a-z_]+", rule["seriesQuery"]).group(0)
    # The adapter fills these per HPA request: label matchers for the pods, grouping by pod.
    # Here there are no pod labels, so select the job and group by instance.
    expr = (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'job="specd"')
            .replace("<<.GroupBy>>", "instance"))
    result = loaded.query(expr)
    assert len(result) == 1 and math.isfinite(float(result[0]["value"][1]))
