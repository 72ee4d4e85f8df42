"""The run report of a pipeline: `<output_dir>/report.md`, PNG plots and a per-stage table.

Inputs, per stage (the manifest's order): `<stage dir>/metrics.jsonl` (the trainer's per-step rows),
`<stage dir>/eval.json` (`gspo eval`), `<stage dir>/stats.json` (a stage's own statistics, if it writes one).
`gspo report OUTPUT_DIR` rebuilds everything from these files. Where each table cell comes from (`COLUMNS`,
first source that has it) and which plots are drawn (`PLOTS`): docs/pipeline.md, "The run report".
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from gspo.training.metrics_log import read_metrics

# Column -> (keys looked up in eval.json, substring of a `rewards/<name>/mean` metric).
COLUMNS = {
    "accuracy": (("accuracy", "pass@1"), "accuracy"),
    "format rate": (("format_rate",), "format"),
    "alignment reward": (("alignment_reward",), "reward_model"),
}
# Plot file -> (title, metric keys or a predicate on the key).
PLOTS = {
    "reward.png": ("mean reward per rollout", ("reward",)),
    "accuracy.png": ("accuracy reward", "accuracy"),
    "length.png": ("mean completion length (tokens)", ("completions/mean_length",)),
    "clip_fraction.png": ("clipped fraction (sequence ratio)", ("clip_frac/low", "clip_frac/high")),
    "expert_load.png": ("expert load", "moe/"),
    "sft_loss.png": ("SFT loss", ("loss",)),
    "eval.png": ("held-out evaluation during RL (train.eval_every)", "eval/"),
}
# Top-level expert-load metrics plotted (per-layer `moe/layer<i>/...` keys stay in metrics.jsonl).
MOE_KEYS = ("moe/load_max_over_mean", "moe/load_cv", "moe/dead_experts", "moe/routing_entropy",
            "moe/routing_drift")


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _reward_key(rows: list[dict[str, Any]], contains: str) -> str | None:
    keys = sorted({k for r in rows for k in r
                   if k.startswith("rewards/") and k.endswith("/mean") and contains in k})
    return keys[0] if keys else None


def _edge_mean(rows: list[dict[str, Any]], key: str, last: bool, frac: float = 0.1) -> float | None:
    """Mean of the first (last=False) or last tenth of the logged values of `key`."""
    values = [v for v in (_number(r.get(key)) for r in rows) if v is not None]
    if not values:
        return None
    n = max(1, int(len(values) * frac))
    edge = values[-n:] if last else values[:n]
    return sum(edge) / n


def _find(d: dict[str, Any], names: tuple[str, ...]) -> float | None:
    for name in names:
        v = _number(d.get(name))
        if v is not None:
            return v
    for v in d.values():  # nested, e.g. {"metrics": {"accuracy": ...}}
        if isinstance(v, dict):
            found = _find(v, names)
            if found is not None:
                return found
    return None


def _column(column: str, ev: dict[str, Any], stats: dict[str, Any],
            rows: list[dict[str, Any]]) -> float | None:
    names, contains = COLUMNS[column]
    for source in (ev, stats):
        key = _reward_key([source], contains)
        value = _number(source.get(key)) if key else None
        if value is None:
            value = _find(source, names)
        if value is not None:
            return value
    key = _reward_key(rows, contains)
    return _edge_mean(rows, key, last=True) if key else None


def stage_summary(stage_dir: str, stage_type: str = "") -> dict[str, Any]:
    """One stage's summary: first/last-10% means of the key metrics, the table cells, eval results."""
    rows = read_metrics(os.path.join(stage_dir, "metrics.jsonl"))
    ev = _read_json(os.path.join(stage_dir, "eval.json"))
    stats = _read_json(os.path.join(stage_dir, "stats.json"))
    out: dict[str, Any] = {"metric_rows": len(rows)}
    if rows:
        out["last_step"] = rows[-1].get("step")
    keys = ["reward", "completions/mean_length", "loss", "clip_frac/high", "clip_frac/low"]
    keys += [k for k in (_reward_key(rows, c[1]) for c in COLUMNS.values()) if k]
    for key in keys:
        first, last = _edge_mean(rows, key, last=False), _edge_mean(rows, key, last=True)
        if last is not None:
            out[f"{key}/first"], out[f"{key}/last"] = first, last
    for column in COLUMNS:
        # A reward model's eval.json holds its pairwise accuracy on preference pairs, not the task's: its
        # numbers go to the stage's section of the report, not to the task columns.
        out[column] = None if stage_type == "reward_model" else _column(column, ev, stats, rows)
    if ev:
        out["eval"] = {k: v for k, v in ev.items() if _number(v) is not None}
    if stats:
        out["stats"] = {k: v for k, v in stats.items() if _number(v) is not None}
    return out


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _fmt_time(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return ""
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def stage_table(manifest: dict[str, Any], summaries: dict[str, dict[str, Any]], *, markdown: bool) -> str:
    """The per-stage table: stage, type, status, accuracy, format rate, alignment reward, wall time."""
    header = ["stage", "type", "status", *COLUMNS, "wall time"]
    body = []
    for st in manifest.get("stages", []):
        s = summaries.get(st["name"], {})
        body.append([st["name"], st.get("type", ""), st.get("status", ""),
                     *(_fmt(s.get(c)) for c in COLUMNS), _fmt_time(st.get("wall_s"))])
    total = sum(st.get("wall_s") or 0 for st in manifest.get("stages", []))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines + ["", f"Total stage time: {_fmt_time(total)}."])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    lines = [line, "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines + [f"total stage time: {_fmt_time(total)}"])


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = _number(r.get(key))
        if v is not None:
            xs.append(float(r.get("step", i + 1)))
            ys.append(v)
    return xs, ys


def _smooth(ys: list[float]) -> list[float]:
    w = max(1, len(ys) // 20)
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out


def _plot_keys(spec: Any, rows: list[dict[str, Any]], stage_type: str, plot: str) -> list[str]:
    if plot == "sft_loss.png":
        return ["loss"] if stage_type == "sft" else []
    if stage_type == "sft":
        return []  # SFT rows have a loss and token accuracy only; the RL plots would mislabel them
    if spec == "eval/":
        return sorted({k for r in rows for k in r if k.startswith(("eval/pass@", "eval/reward/mean"))})
    if spec == "moe/":
        present = {k for r in rows for k in r}
        return [k for k in MOE_KEYS if k in present]
    if isinstance(spec, str):
        key = _reward_key(rows, spec)
        return [key] if key else []
    return list(spec)


def make_plots(output_dir: str, manifest: dict[str, Any]) -> list[str]:
    """Write the PNG plots; returns the file names written (none without matplotlib or metrics)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    stages = []
    offset = 0.0
    for st in manifest.get("stages", []):
        rows = read_metrics(os.path.join(output_dir, st["name"], "metrics.jsonl"))
        stages.append((st["name"], st.get("type", ""), rows, offset))
        if rows:
            offset += max(float(r.get("step", 0) or 0) for r in rows)
    written = []
    for plot, (title, spec) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 3.6))
        drawn = False
        for idx, (name, stage_type, rows, off) in enumerate(stages):
            color = f"C{idx % 10}"
            keys = _plot_keys(spec, rows, stage_type, plot)
            for k_i, key in enumerate(keys):
                xs, ys = _series(rows, key)
                if not xs:
                    continue
                xs = [x + off for x in xs]
                style = ["-", "--", ":", "-.", (0, (1, 3))][k_i % 5]
                label = name if len(keys) == 1 else f"{name}: {key}"
                if len(ys) > 20:
                    ax.plot(xs, ys, color=color, alpha=0.2, linewidth=0.8)
                ax.plot(xs, _smooth(ys), color=color, linestyle=style, label=label)
                drawn = True
            if drawn and off > 0:
                ax.axvline(off, color="grey", linewidth=0.5)
        path = os.path.join(output_dir, plot)
        if drawn:
            ax.set_title(title)
            ax.set_xlabel("optimizer step (stages concatenated)")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            written.append(plot)
        elif os.path.exists(path):
            os.remove(path)  # a rebuilt report never shows a plot of metrics the run no longer has
        plt.close(fig)
    return written


def write_report(output_dir: str) -> str:
    """(Re)build `<output_dir>/report.md` and the plots from the manifest; returns the plain-text table."""
    from gspo.pipeline.manifest import read_manifest

    manifest = read_manifest(output_dir)
    if not manifest:
        raise FileNotFoundError(f"{os.path.join(output_dir, 'manifest.json')} does not exist: not a pipeline "
                                "run")
    summaries = {st["name"]: stage_summary(os.path.join(output_dir, st["name"]), st.get("type", ""))
                 for st in manifest["stages"]}
    plots = make_plots(output_dir, manifest)
    lines = [f"# Run report: {manifest.get('name', '')}", "",
             (f"Output: `{manifest.get('output_dir', output_dir)}`; pipeline file: "
              f"`{manifest.get('pipeline_file', '')}`."),
             "", stage_table(manifest, summaries, markdown=True), ""]
    first = next((st for st in manifest["stages"] if st.get("versions")), {})
    if first:
        vers = ", ".join(f"{k} {v}" for k, v in first["versions"].items() if v)
        lines += [f"Versions: {vers}. Commit: `{first.get('git_commit') or 'unknown'}`.", ""]
    lines += ["## Stages", ""]
    for st in manifest["stages"]:
        s = summaries[st["name"]]
        lines.append(f"### {st['name']} ({st.get('type', '')}, {st.get('status', '')})")
        lines.append("")
        if st.get("output"):
            lines.append(f"- output: `{st['output']}`")
        for key, w in (st.get("wiring") or {}).items():
            lines.append(f"- `{key}` <- {w['from']}: `{w['value']}`")
        if st.get("resumed_from"):
            lines.append(f"- resumed from checkpoint `{st['resumed_from']}`")
        for key in ("reward", "completions/mean_length", "loss"):
            if s.get(f"{key}/last") is not None:
                lines.append(f"- {key}: first 10% {_fmt(s.get(f'{key}/first'))}, "
                             f"last 10% {_fmt(s[f'{key}/last'])}")
        for key, value in (s.get("stats") or {}).items():
            lines.append(f"- {key}: {_fmt(value)}")
        for key, value in (s.get("eval") or {}).items():
            if _number(value) is not None:
                lines.append(f"- eval {key}: {_fmt(value)}")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots] + [""]
    else:
        lines += ["(No plots: matplotlib is not installed or no stage logged metrics.)", ""]
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return stage_table(manifest, summaries, markdown=False)
