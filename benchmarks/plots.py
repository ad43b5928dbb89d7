"""PNG charts of benchmark results, written next to their JSON: `results/spec.json` gets
`results/spec_speedup.png` and `results/spec_latency.png`, so a reader can look instead of read.

- speedup: speedup over `--spec none` by concurrency, one line per method (and layout); for the
  serving benchmark, output tok/s by concurrency and its speedup over concurrency 1.
- latency: TTFT / inter-token / end-to-end latency p50 (solid) and p99 (dashed) by concurrency.

matplotlib is optional (`pip install -e '.[bench]'`, or `make bench`); without it the charts are
skipped with a message and the JSON is still written. Re-plot a saved result without rerunning:

    .venv/bin/python benchmarks/plots.py benchmarks/results/spec.json
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

LATENCIES = (("ttft", "time to first token"), ("itl", "inter-token latency"), ("e2e", "end-to-end latency"))
MISSING = "matplotlib is not installed (pip install -e '.[bench]'): skipping the PNG charts"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def series_label(row: dict) -> str:
    if "system" in row:
        return row["system"]
    layout = row.get("layout")
    return f"{row['method']} ({layout})" if layout and layout != "ragged" else row["method"]


def overall(rows: list[dict]) -> list[dict]:
    """The rows over all prompts (per-category rows are left to the table)."""
    return [r for r in rows if r.get("category", "all") == "all"]


def _by_series(rows: list[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    out = defaultdict(list)
    for r in rows:
        if r.get(key) is not None and r.get("concurrency") is not None:
            out[series_label(r)].append((r["concurrency"], r[key]))
    return {label: sorted(points) for label, points in out.items()}


def _log2_x(ax, xs) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(xs))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("concurrent requests")
    ax.grid(True, alpha=0.3)


def plot_spec_speedup(plt, rows: list[dict], path: Path) -> bool:
    lines = {k: v for k, v in _by_series(overall(rows), "speedup").items() if k != "none"}
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, pts in sorted(lines.items()):
        ax.plot(*zip(*pts), marker="o", linestyle="--" if "padded" in label else "-", label=label)
    ax.axhline(1.0, color="grey", linewidth=1, label="--spec none")
    _log2_x(ax, [c for pts in lines.values() for c, _ in pts])
    ax.set_ylabel("speedup over --spec none (tok/s ratio)")
    ax.set_title("Speculative decoding speedup by concurrency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_serving_throughput(plt, rows: list[dict], path: Path) -> bool:
    lines = _by_series(overall(rows), "output_tok_s")
    specd = lines.get("specd")
    if not specd:
        return False
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, pts in sorted(lines.items()):
        ax.plot(*zip(*pts), marker="o", label=label)
    base = dict(specd).get(1) or specd[0][1]
    ax2.plot([c for c, _ in specd], [v / base for _, v in specd], marker="o", label="specd")
    ax2.plot([c for c, _ in specd], [c for c, _ in specd], color="grey", linestyle=":", label="linear")
    for a, ylabel in ((ax, "output tok/s"), (ax2, "speedup over concurrency 1")):
        _log2_x(a, [c for c, _ in specd])
        a.set_ylabel(ylabel)
        a.legend(fontsize=8)
    ax.set_title("Throughput by concurrency")
    ax2.set_title("Batching speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_latency(plt, rows: list[dict], path: Path) -> bool:
    rows = overall(rows)
    metrics = [(key, title) for key, title in LATENCIES if any(r.get(f"{key}_p50") is not None for r in rows)]
    if not metrics:
        return False
    from matplotlib.ticker import FuncFormatter

    colors = {label: f"C{i}" for i, label in enumerate(sorted({series_label(r) for r in rows}))}
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    sparse = FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and f"{v:.0e}"[0] in "25" else "")  # 2s and 5s only
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics):
        xs = []
        for q, style in (("p50", "-"), ("p99", "--")):
            for label, pts in sorted(_by_series(rows, f"{key}_{q}").items()):
                ax.plot(*zip(*pts), marker="o", linestyle=style, color=colors[label], label=f"{label} {q}")
                xs += [c for c, _ in pts]
        _log2_x(ax, xs)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(sparse)
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


CHARTS = {
    "spec": (("speedup", plot_spec_speedup), ("latency", plot_latency)),
    "serving": (("throughput", plot_serving_throughput), ("latency", plot_latency)),
}


def save_charts(json_path: Path, benchmark: str, rows: list[dict], log=print) -> list[str]:
    """Write `<stem>_<chart>.png` beside json_path for every chart the rows have data for."""
    plt = _pyplot()
    if plt is None:
        log(MISSING)
        return []
    written = []
    for name, plot in CHARTS.get(benchmark, ()):
        path = json_path.with_name(f"{json_path.stem}_{name}.png")
        if plot(plt, rows, path):
            written.append(str(path))
        else:
            log(f"no data for the {name} chart of {json_path.name}: skipped")
    return written


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for arg in argv:
        path = Path(arg)
        text = path.read_text()
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:  # a saved stdout: the JSON is its last line
            payload = json.loads(text.strip().splitlines()[-1])
        for chart in save_charts(path, payload["benchmark"], payload["rows"]):
            print(chart)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
