"""Outputs of the benchmark harness: markdown (RESULTS.md), CSV, JSON and matplotlib plots."""

from __future__ import annotations

import csv
import json
import math
import os
import time

COLUMNS = ("variant", "runtime", "params", "MACs", "MB", "ms (IQR)", "speedup", "session MB",
           "cosine", "SQNR dB", "top-1 agree", "accuracy", "tool s", "status")


def _num(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def _human(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def markdown(rows: list[dict], command: str, machine: str, seconds: float) -> str:
    lines = ["# graphslim benchmark results", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}, {machine}, in "
             f"{seconds / 60:.1f} min. Latency: ONNX Runtime (ORT_ENABLE_ALL) or torch eager, "
             "batch 1, median of interleaved runs against the baseline in the same process "
             "(at least 5 pairs, up to the matrix's repeats, within 3 s of timing per cell; "
             "speedup = baseline / variant). Fidelity: the variant's outputs against the "
             "baseline's on the same inputs (real data where the model has it, else seeded "
             "normal inputs). Accuracy: real held-out data (MNIST digits, text crops, rotated "
             "pages). session MB: resident memory an ORT session of the variant adds. Random "
             "torchvision weights: fidelity of lossy variants on them says little; accuracy "
             "rows come from trained models.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        base = next((r.get("base_ms") for r in mine if r.get("base_ms")), None)
        acc = next((r.get("accuracy_base") for r in mine if r.get("accuracy_base") is not None),
                   None)
        head = f"## {model}"
        if acc is not None:
            head += f" (baseline accuracy {acc:.3f})"
        lines += [head, "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        for r in mine:
            ms = f"{_num(r.get('ms'), '.2f')} ({_num(r.get('iqr_ms'), '.2f')})" \
                if r.get("ms") else "-"
            lines.append("| " + " | ".join([
                f"`{r['variant']}`" + (" (peer)" if r.get("kind") == "peer" else ""),
                r["runtime"], _human(r.get("params")), _human(r.get("macs")),
                _num(r.get("file_mb"), ".2f"), ms, _num(r.get("speedup"), ".2f"),
                _num(r.get("session_mb"), ".0f"), _num(r.get("cosine"), ".4f"),
                _num(r.get("sqnr_db"), ".1f"), _num(r.get("top1_agree"), ".3f"),
                _num(r.get("accuracy"), ".3f"), _num(r.get("tool_s"), ".2f"),
                r["status"][:90]]) + " |")
        if base:
            lines.append(f"\nbaseline latency (first runtime measured): {base:.2f} ms")
        lines.append("")
    return "\n".join(lines)


def write_all(rows: list[dict], out: str, command: str, machine: str, seconds: float) -> str:
    md = markdown(rows, command, machine, seconds)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1, default=float)
    keys = sorted({k for r in rows for k in r})
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    plots(rows, out)
    return md


def plots(rows: list[dict], out: str) -> list[str]:
    """Latency vs fidelity per model (one point per pipeline and peer), and speedup vs MACs
    reduction over all models; skipped with a message without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib not installed: no plots (pip install matplotlib)")
        return []
    made = []
    ok = [r for r in rows if r["status"] == "ok" and r.get("ms")]
    runtime = next((r["runtime"] for r in ok), None)
    models = list(dict.fromkeys(r["model"] for r in ok))
    if models:
        fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models):
            pts = [r for r in ok if r["model"] == model and r["runtime"] == runtime]
            for r in pts:
                y = r.get("accuracy", r.get("cosine"))
                ax.scatter(r["ms"], y, marker="s" if r.get("kind") == "peer" else "o")
                ax.annotate(r["variant"][:28], (r["ms"], y), fontsize=6)
            if pts:
                ax.axvline(pts[0]["base_ms"], color="gray", lw=0.5)
            ax.set_title(model, fontsize=9)
            ax.set_xlabel(f"latency ms ({runtime})")
            ax.set_ylabel("accuracy" if any("accuracy" in r for r in pts) else "cosine to base")
        fig.tight_layout()
        path = os.path.join(out, "latency_vs_fidelity.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    base_macs = {}  # fold-bn keeps MACs (BatchNorm counts none): its row gives the baseline's
    for r in rows:
        if r["variant"] == "fold-bn" and r.get("macs"):
            base_macs[r["model"]] = r["macs"]
    pts = [r for r in ok if r.get("macs") and r["model"] in base_macs]
    if pts:
        fig, ax = plt.subplots(figsize=(5, 4))
        for r in pts:
            ax.scatter(base_macs[r["model"]] / r["macs"], r["speedup"], s=12,
                       marker="s" if r.get("kind") == "peer" else "o")
        lim = max(max(base_macs[r["model"]] / r["macs"] for r in pts),
                  max(r["speedup"] for r in pts)) * 1.1
        ax.plot([0, lim], [0, lim], color="gray", lw=0.5)
        ax.set_xlabel("MACs reduction (x)")
        ax.set_ylabel("measured speedup (x), squares: peers")
        fig.tight_layout()
        path = os.path.join(out, "speedup_vs_macs.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    return made
