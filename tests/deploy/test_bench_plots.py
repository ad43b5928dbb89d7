"""Benchmark charts: PNGs beside the JSON when matplotlib is installed, a message when it is not."""
from __future__ import annotations

import json
import sys

import pytest

from benchmarks import plots
from benchmarks.common import RequestTiming, latency_summary, write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def spec_rows() -> list[dict]:
    rows = []
    for layout in ("ragged", "padded"):
        for method in ("none", "ngram", "jacobi"):
            for c in (1, 4, 16):
                rows.append({"layout": layout, "method": method, "concurrency": c, "category": "all",
                             "tok_s": 20.0 * c, "speedup": 1.0 if method == "none" else 1.3 - 0.02 * c,
                             "ttft_p50": 0.1 * c, "ttft_p99": 0.3 * c, "itl_p50": 0.04, "itl_p99": 0.09,
                             "e2e_p50": 2.0, "e2e_p99": 4.0})
                rows.append({**rows[-1], "category": "code_edit", "speedup": 3.0})
    return rows


def serving_rows() -> list[dict]:
    rows = [{"system": "specd", "concurrency": c, "output_tok_s": 19.0 * c ** 0.5, "ttft_p50": 0.2 * c,
             "ttft_p99": 0.5 * c, "itl_p50": 0.05, "itl_p99": 0.1} for c in (1, 4, 16)]
    return rows + [{"system": "hf-generate", "concurrency": 1, "output_tok_s": 15.0, "ttft_p50": 0.25,
                    "ttft_p99": 1.9}]


def test_latency_summary_percentiles():
    timings = [RequestTiming("qa", ttft=t, e2e=2 * t, token_times=[t, t + 0.1, t + 0.3]) for t in (0.1, 0.2, 0.3)]
    summary = latency_summary(timings)
    assert summary["ttft_p50"] == 0.2 and summary["ttft_p99"] == 0.3 and summary["e2e_p99"] == 0.6
    assert summary["itl_p50"] == pytest.approx(0.1) and summary["itl_p99"] == pytest.approx(0.2)


@pytest.mark.parametrize("benchmark,rows,names", [
    ("spec", spec_rows(), ["speedup", "latency"]),
    ("serving", serving_rows(), ["throughput", "latency"]),
])
def test_charts_are_pngs_next_to_the_json(tmp_path, capsys, benchmark, rows, names):
    pytest.importorskip("matplotlib")
    out = tmp_path / f"{benchmark}.json"
    write_results({"benchmark": benchmark, "rows": rows}, out)
    saved = json.loads(out.read_text())
    expected = [str(tmp_path / f"{benchmark}_{name}.png") for name in names]
    assert saved["charts"] == expected and saved["rows"] == rows
    for path in expected:
        data = open(path, "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000  # a drawn chart, not an empty canvas
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved


def test_a_chart_without_data_is_skipped_with_a_message(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{k: v for k, v in r.items() if not k.endswith(("_p50", "_p99"))} for r in spec_rows()]
    messages = []
    charts = plots.save_charts(tmp_path / "old.json", "spec", rows, log=messages.append)
    assert charts == [str(tmp_path / "old_speedup.png")]
    assert messages == ["no data for the latency chart of old.json: skipped"]


def test_without_matplotlib_the_json_is_written_and_the_charts_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "spec.json"
    write_results({"benchmark": "spec", "rows": spec_rows()}, out)
    assert json.loads(out.read_text())["charts"] == []
    assert not list(tmp_path.glob("*.png"))
    assert plots.MISSING in capsys.readouterr().out


def test_replot_a_saved_result(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    saved = tmp_path / "serving_cpu.json"
    saved.write_text("some table text\n" + json.dumps({"benchmark": "serving", "rows": serving_rows()}) + "\n")
    assert plots.main([str(saved)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "serving_cpu_throughput.png"),
                                               str(tmp_path / "serving_cpu_latency.png")]


def test_spec_layout_ratios_are_ragged_over_each_padded_layout():
    from benchmarks.spec import layout_ratios

    rows = [{"server": "main", "layout": layout, "method": "ngram", "concurrency": 8, "category": category,
             "tok_s": tok_s} for layout, tok_s in (("ragged", 120.0), ("padded", 100.0), ("padded-kv", 80.0))
            for category in ("all", "qa")]
    assert layout_ratios(rows) == [
        {"layout": "padded", "method": "ngram", "concurrency": 8, "ratio": 1.2},
        {"layout": "padded-kv", "method": "ngram", "concurrency": 8, "ratio": 1.5}]
