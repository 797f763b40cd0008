"""Tables and plots of a sweep's results directory (python -m omoe_ds.sweep writes it).

    python -m omoe_ds.report results/trec_sweep                 # -> results/trec_sweep/report/
    python -m omoe_ds.report results/trec_sweep --out-dir docs/figures --dpi 80

Writes report.md: one row per cell configuration (mean ± sample std over its seeds) with the primary
metric on dev and test, the mean expert parameter variance, O steps and training time, then the data of
each plot and the failed cells; and PNGs (matplotlib, Agg):
  skip_step.png            score and expert parameter variance vs skip step s, OMoE vs its baseline (paper Fig. 4)
  experts_gain.png         score of OMoE and the baseline, and OMoE's gain, vs experts per layer M (paper Fig. 5)
  experts_scaling.png      vs M, OMoE and the baseline: dev/test score, expert parameter variance, median R- and
                           O-step seconds (O/R ratio), peak RSS and projector bytes per rank (max over ranks)
  optimizers.png           each base optimizer with and without OMoE, grouped bars (paper Table VIII)
  per_layer_diversity.png  per layer, parameter variance across experts and % of positions where two experts
                           differ by > 1e-3, for W1 and W2, OMoE vs baseline (paper Fig. 3 / Tables I-II)
A plot whose data the results do not hold is skipped, with a line saying which cells it would need.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PERCENT_METRICS = {"accuracy", "f1", "exact_match", "precision", "recall"}
CONFIG_KEYS = ("optimizer", "base_optimizer", "experts", "ep_size", "skip_step", "alpha0", "lam", "tag")
OMOE_COLOR, BASE_COLOR = "tab:red", "tab:blue"
PAPER_S, PAPER_M = 5, 4  # paper A's defaults, preferred when several slices of a grid qualify


# -------------------------------------------------------------------------------------------- loading

def _cell_config(cell_dir: str, results: dict) -> dict:
    """The cell's grid coordinates: from the sweep's cell.json, else from results.json's recorded args."""
    try:
        with open(os.path.join(cell_dir, "cell.json")) as f:
            c = json.load(f)
        config = {k: c.get(k) for k in CONFIG_KEYS}
    except (OSError, ValueError):
        a = results.get("config", {}).get("args", {})
        omoe = results.get("config", {}).get("deepspeed", {}).get("omoe", {})
        config = {"optimizer": results["optimizer"], "base_optimizer": results.get("base_optimizer"),
                  "experts": a.get("experts"), "ep_size": a.get("ep_size"), "skip_step": omoe.get("skip_step"),
                  "alpha0": omoe.get("alpha0"), "lam": omoe.get("lam"), "tag": ""}
    if config["optimizer"] != "omoe":
        config.update(skip_step=None, alpha0=None, lam=None, base_optimizer=config["optimizer"])
    config["tag"] = config.get("tag") or ""
    return config


def load_cells(results_dir: str) -> Tuple[List[dict], List[dict]]:
    """(finished runs, each {"name", "config", "results"}; failed cells from status.json/sweep.jsonl)."""
    cells_dir = os.path.join(results_dir, "cells")
    if not os.path.isdir(cells_dir):
        raise SystemExit(f"{results_dir} holds no cells/ directory: is it a results dir of python -m omoe_ds.sweep?")
    runs = []
    for name in sorted(os.listdir(cells_dir)):
        d = os.path.join(cells_dir, name)
        try:
            with open(os.path.join(d, "results.json")) as f:
                r = json.load(f)
            r["dev"][r["primary_metric"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        runs.append({"name": name, "dir": d, "config": _cell_config(d, r), "results": r})
    failed = []
    status_path = os.path.join(results_dir, "sweep.jsonl")
    latest = {}
    if os.path.isfile(status_path):
        with open(status_path) as f:
            for line in f:
                try:
                    e = json.loads(line)
                    latest[e["cell"]] = e
                except (ValueError, KeyError):
                    continue
    finished = {r["name"] for r in runs}
    failed = [e for name, e in sorted(latest.items()) if e.get("status") == "failed" and name not in finished]
    return runs, failed


# ----------------------------------------------------------------------------------------- statistics

def mean_std(values: List[float]) -> Tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


class Group:
    """The runs of one cell configuration over seeds."""

    def __init__(self, config: dict, runs: List[dict], metric: str, split: str):
        self.config, self.runs, self.metric, self.split = config, runs, metric, split
        self.seeds = sorted(r["results"]["seed"] for r in runs)

    def score(self, split: Optional[str] = None) -> Tuple[float, float]:
        split = split or self.split
        return mean_std([r["results"].get(split, {}).get(self.metric) for r in self.runs])

    def scores_by_seed(self) -> Dict[int, float]:
        return {r["results"]["seed"]: r["results"].get(self.split, {}).get(self.metric) for r in self.runs}

    def variance(self) -> Tuple[float, float]:
        return mean_std([r["results"].get("mean_expert_param_variance") for r in self.runs])

    def field(self, key: str) -> Tuple[float, float]:
        return mean_std([r["results"].get(key) for r in self.runs])

    def layer_figures(self, weight: str, key: str) -> List[float]:
        """Per layer, the seed mean of diversity.layers[l][weight][key]."""
        per_run = [[layer[weight][key] for layer in r["results"]["diversity"]["layers"]] for r in self.runs]
        return [statistics.mean(col) for col in zip(*per_run)]

    @property
    def is_omoe(self) -> bool:
        return self.config["optimizer"] == "omoe"

    @property
    def label(self) -> str:
        c = self.config
        return f"OMoE/{c['base_optimizer']}" if self.is_omoe else c["optimizer"]


def group_runs(runs: List[dict]) -> Tuple[List[Group], str, str]:
    metrics = Counter(r["results"]["primary_metric"] for r in runs)
    metric = metrics.most_common(1)[0][0]
    runs = [r for r in runs if r["results"]["primary_metric"] == metric]
    split = "test" if all(metric in r["results"].get("test", {}) for r in runs) else "dev"
    by_config = defaultdict(list)
    for r in runs:
        by_config[tuple(r["config"][k] for k in CONFIG_KEYS)].append(r)
    groups = [Group(dict(zip(CONFIG_KEYS, key)), rs, metric, split) for key, rs in by_config.items()]
    groups.sort(key=lambda g: (g.config["tag"], g.config["base_optimizer"], g.config["experts"], not g.is_omoe,
                               g.config["skip_step"] or 0, g.config["alpha0"] or 0, g.config["lam"] or 0))
    return groups, metric, split


def baseline_of(groups: List[Group], g: Group) -> Optional[Group]:
    """The plain run of g's base optimizer with g's experts, EP size and train flags."""
    for b in groups:
        c = b.config
        if not b.is_omoe and c["optimizer"] == g.config["base_optimizer"] and all(
                c[k] == g.config[k] for k in ("experts", "ep_size", "tag")):
            return b
    return None


# ---------------------------------------------------------------------------------------- formatting

def metric_scale(metric: str) -> Tuple[float, str]:
    return (100.0, " (%)") if metric in PERCENT_METRICS else (1.0, "")


def fmt(ms: Tuple[float, float], scale: float = 1.0, sci: bool = False, digits: int = 2, n: int = 1) -> str:
    m, s = ms
    if m is None or math.isnan(m):
        return "–"
    if sci:
        return f"{m:.3e}" + (f" ± {s:.1e}" if n > 1 else "")
    return f"{m * scale:.{digits}f}" + (f" ± {s * scale:.{digits}f}" if n > 1 else "")


def _num(x) -> str:
    return "–" if x is None else (f"{x:g}" if isinstance(x, float) else str(x))


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(groups: List[Group], metric: str) -> str:
    scale, unit = metric_scale(metric)
    header = ["optimizer", "M", "EP", "s", "α0", "λ", "seeds", f"dev {metric}{unit}", f"test {metric}{unit}",
              "mean expert param variance", "O steps", "steps", "train s"]
    rows = []
    for g in groups:
        c, n = g.config, len(g.runs)
        label = g.label + (f" [{c['tag']}]" if c["tag"] else "")
        rows.append([label, str(c["experts"]), str(c["ep_size"]), _num(c["skip_step"]), _num(c["alpha0"]),
                     _num(c["lam"]), ",".join(map(str, g.seeds)), fmt(g.score("dev"), scale, n=n),
                     fmt(g.score("test"), scale, n=n), fmt(g.variance(), sci=True, n=n),
                     fmt(g.field("o_steps"), digits=0, n=1), fmt(g.field("steps"), digits=0, n=1),
                     fmt(g.field("train_seconds"), digits=0, n=n)])
    return markdown_table(header, rows)


# ---------------------------------------------------------------------------------------------- plots

def _prefer(candidates: List[Tuple[dict, object]], size) -> Tuple[dict, object]:
    """The slice with the most points; ties go to the paper's defaults (s=5, M=4), then the first."""
    return max(candidates, key=lambda kv: (size(kv[1]), kv[0].get("base_optimizer") == "adamw",
                                           kv[0].get("skip_step") == PAPER_S, kv[0].get("experts") == PAPER_M))


def _errorbar(ax, xs, ms, color, label, marker="o", **kw):
    means = [m for m, _ in ms]
    stds = [s for _, s in ms]
    ax.errorbar(xs, means, yerr=stds if any(s > 0 for s in stds) else None, color=color, marker=marker,
                capsize=3, label=label, **kw)


def _baseline_line(ax, ms, scale, label, color=BASE_COLOR):
    m, s = ms
    ax.axhline(m * scale, color=color, linestyle="--", label=label)
    if s > 0:
        ax.axhspan((m - s) * scale, (m + s) * scale, color=color, alpha=0.12)


def _seeds_note(groups: List[Group]) -> str:
    seeds = sorted({len(g.runs) for g in groups})
    return (f"{seeds[0]} seed" + ("s, mean ± std" if seeds[0] > 1 else ", no error bars")) if len(seeds) == 1 \
        else f"{seeds[0]}–{seeds[-1]} seeds, mean ± std"


def _context(groups: List[Group]) -> str:
    r = groups[0].runs[0]["results"]
    a = r.get("config", {}).get("args", {})
    return f"{r['task']} · {r['model']} · {r['steps']} steps · {r['world_size']} ranks · {_seeds_note(groups)}" \
        + (f" · lr {a['lr']:g}" if "lr" in a else "")


def _log_x(ax, xs, base=10):
    """A log x axis ticked at the grid's values only (s and M are sparse grids)."""
    ax.set_xscale("log", base=base)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_skip_step(groups: List[Group], metric: str, split: str, path: str) -> Optional[str]:
    slices = defaultdict(list)
    for g in groups:
        if g.is_omoe:
            c = g.config
            slices[(c["base_optimizer"], c["experts"], c["ep_size"], c["alpha0"], c["lam"], c["tag"])].append(g)
    slices = {k: v for k, v in slices.items() if len({g.config["skip_step"] for g in v}) >= 2}
    if not slices:
        return None
    key, sel = _prefer([({"base_optimizer": k[0], "experts": k[1]}, v) for k, v in slices.items()], len)
    sel = sorted(sel, key=lambda g: g.config["skip_step"])
    base = baseline_of(groups, sel[0])
    scale, unit = metric_scale(metric)
    xs = [g.config["skip_step"] for g in sel]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    _errorbar(a1, xs, [(m * scale, s * scale) for m, s in (g.score() for g in sel)], OMOE_COLOR, sel[0].label)
    _errorbar(a2, xs, [g.variance() for g in sel], OMOE_COLOR, sel[0].label)
    if base is not None:
        _baseline_line(a1, base.score(), scale, f"{base.label} (no O steps)")
        _baseline_line(a2, base.variance(), 1.0, f"{base.label} (no O steps)")
    a1.set(xlabel="skip step s (an O step every s optimizer steps; log scale)", ylabel=f"{split} {metric}{unit}",
           title=f"{split.capitalize()} {metric} vs skip step")
    a2.set(xlabel="skip step s (an O step every s optimizer steps; log scale)",
           ylabel="variance across experts\n(mean over parameter positions)", title="Expert parameter variance vs skip step")
    a2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in (a1, a2):
        _log_x(ax, xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"OMoE skip step s, M={sel[0].config['experts']} experts ({_context(sel)})", fontsize=9)
    _save(fig, path)
    rows = [[f"OMoE/{g.config['base_optimizer']}", str(g.config["skip_step"]), fmt(g.score(), scale, n=len(g.runs)),
             fmt(g.variance(), sci=True, n=len(g.runs)), fmt(g.field("o_steps"), digits=0)] for g in sel]
    if base is not None:
        rows.append([base.label, "– (no O steps)", fmt(base.score(), scale, n=len(base.runs)),
                     fmt(base.variance(), sci=True, n=len(base.runs)), "0"])
    return markdown_table(["optimizer", "s", f"{split} {metric}{unit}", "mean expert param variance", "O steps"], rows)


def _gain(omoe: Group, base: Group) -> Tuple[float, float]:
    """OMoE minus baseline: mean and std of the per-seed differences where seeds pair up, else of the means."""
    a, b = omoe.scores_by_seed(), base.scores_by_seed()
    paired = [a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None]
    if len(paired) == min(len(a), len(b)) and paired:
        return mean_std(paired)
    (ma, sa), (mb, sb) = omoe.score(), base.score()
    return ma - mb, math.hypot(sa, sb)


def experts_slice(groups: List[Group], needs=lambda g: True) -> Optional[List[Tuple[Group, Group]]]:
    """(OMoE, baseline) pairs at >= 2 expert counts with one base optimizer, s, α0, λ and train flags, sorted
    by M; only pairs whose groups all pass `needs`."""
    slices = defaultdict(list)
    for g in groups:
        base = baseline_of(groups, g) if g.is_omoe else None
        if base is not None and needs(g) and needs(base):
            c = g.config
            slices[(c["base_optimizer"], c["skip_step"], c["alpha0"], c["lam"], c["tag"])].append((g, base))
    slices = {k: v for k, v in slices.items() if len({g.config["experts"] for g, _ in v}) >= 2}
    if not slices:
        return None
    _, sel = _prefer([({"base_optimizer": k[0], "skip_step": k[1]}, v) for k, v in slices.items()], len)
    return sorted(sel, key=lambda gb: gb[0].config["experts"])


def plot_experts(groups: List[Group], metric: str, split: str, path: str) -> Optional[str]:
    sel = experts_slice(groups)
    if sel is None:
        return None
    scale, unit = metric_scale(metric)
    xs = [g.config["experts"] for g, _ in sel]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    _errorbar(a1, xs, [(m * scale, s * scale) for m, s in (g.score() for g, _ in sel)], OMOE_COLOR, sel[0][0].label)
    _errorbar(a1, xs, [(m * scale, s * scale) for m, s in (b.score() for _, b in sel)], BASE_COLOR, sel[0][1].label,
              marker="s")
    gains = [_gain(g, b) for g, b in sel]
    bars = a2.bar([str(x) for x in xs], [m * scale for m, _ in gains],
                  yerr=[s * scale for _, s in gains] if any(s > 0 for _, s in gains) else None,
                  color=[OMOE_COLOR if m >= 0 else BASE_COLOR for m, _ in gains], capsize=3)
    a2.bar_label(bars, labels=[f"{m * scale:+.2f}" for m, _ in gains], fontsize=8)
    a2.margins(y=0.15)
    a2.axhline(0, color="black", linewidth=0.8)
    a1.set(xlabel="experts per MoE layer M", ylabel=f"{split} {metric}{unit}", title=f"{split.capitalize()} {metric} vs M")
    _log_x(a1, xs, base=2)
    a2.set(xlabel="experts per MoE layer M",
           ylabel=f"OMoE − baseline, {split} {metric}" + (" (points)" if scale == 100 else ""),
           title="OMoE gain vs number of experts")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle(f"Number of experts, s={sel[0][0].config['skip_step']} ({_context([g for g, _ in sel])})", fontsize=9)
    _save(fig, path)
    rows = [[str(g.config["experts"]), str(g.config["ep_size"]), fmt(b.score(), scale, n=len(b.runs)),
             fmt(g.score(), scale, n=len(g.runs)), fmt(gain, scale, n=min(len(g.runs), len(b.runs))),
             fmt(b.variance(), sci=True, n=len(b.runs)), fmt(g.variance(), sci=True, n=len(g.runs)),
             fmt(g.field("o_steps"), digits=0)] for (g, b), gain in zip(sel, gains)]
    return markdown_table(["M", "EP", f"{sel[0][1].label} {split} {metric}{unit}",
                           f"{sel[0][0].label} {split} {metric}{unit}", "OMoE gain" + (" (points)" if scale == 100 else ""),
                           f"{sel[0][1].label} param var", f"{sel[0][0].label} param var", "O steps"], rows)


COST_FIELDS = ("r_step_s", "peak_rss_bytes_per_rank", "projector_bytes_per_rank")  # results.json's timing and memory
MIB = 2 ** 20


def _has_costs(g: Group) -> bool:
    return all(r["results"].get(k) is not None for r in g.runs for k in COST_FIELDS) and \
        (not g.is_omoe or all(r["results"].get("o_step_s") is not None for r in g.runs))


def _o_step_ratio(g: Group) -> Tuple[float, float]:
    return mean_std([r["results"]["o_step_s"] / r["results"]["r_step_s"] for r in g.runs])


def plot_experts_scaling(groups: List[Group], metric: str, split: str, path: str) -> Optional[str]:
    """What M costs and buys: dev/test score, expert parameter variance, R/O step seconds and memory per rank vs M,
    OMoE vs its baseline, one panel each."""
    sel = experts_slice(groups, _has_costs)
    if sel is None:
        return None
    scale, unit = metric_scale(metric)
    xs = [g.config["experts"] for g, _ in sel]
    omoe, base = [g for g, _ in sel], [b for _, b in sel]
    scaled = lambda groups, which: [(m * scale, s * scale) for m, s in (g.score(which) for g in groups)]  # noqa: E731
    field = lambda groups, key, unit=1.0: [(m / unit, s / unit) for m, s in (g.field(key) for g in groups)]  # noqa: E731
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    (a1, a2), (a3, a4) = axes
    for which, marker, style in (("test", "o", "-"), ("dev", "^", ":")):
        if all(which in r["results"] for g in omoe + base for r in g.runs):
            _errorbar(a1, xs, scaled(omoe, which), OMOE_COLOR, f"{omoe[0].label} {which}", marker, linestyle=style)
            _errorbar(a1, xs, scaled(base, which), BASE_COLOR, f"{base[0].label} {which}", marker, linestyle=style)
    a1.set(ylabel=f"{metric}{unit}", title=f"Dev and test {metric} vs M")
    _errorbar(a2, xs, [g.variance() for g in omoe], OMOE_COLOR, omoe[0].label)
    _errorbar(a2, xs, [g.variance() for g in base], BASE_COLOR, base[0].label, marker="s")
    a2.set(ylabel="variance across experts\n(mean over parameter positions)", title="Expert parameter variance vs M")
    a2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    _errorbar(a3, xs, field(omoe, "o_step_s"), OMOE_COLOR, f"{omoe[0].label} O step")
    _errorbar(a3, xs, field(omoe, "r_step_s"), OMOE_COLOR, f"{omoe[0].label} R step", marker="^", linestyle=":")
    _errorbar(a3, xs, field(base, "r_step_s"), BASE_COLOR, f"{base[0].label} step", marker="s")
    for x, g in zip(xs, omoe):
        a3.annotate(f"×{_o_step_ratio(g)[0]:.2f}", (x, g.field("o_step_s")[0]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=7, color=OMOE_COLOR)
    a3.set(ylabel="seconds per optimizer step (median)", title="Step time vs M (×: O step / R step)")
    a3.set_ylim(bottom=0)
    a3.margins(y=0.15)
    _errorbar(a4, xs, field(omoe, "peak_rss_bytes_per_rank", MIB), OMOE_COLOR, f"{omoe[0].label} peak RSS")
    _errorbar(a4, xs, field(base, "peak_rss_bytes_per_rank", MIB), BASE_COLOR, f"{base[0].label} peak RSS", marker="s")
    _errorbar(a4, xs, field(omoe, "projector_bytes_per_rank", MIB), OMOE_COLOR, f"{omoe[0].label} projectors held",
              marker="D", linestyle="--")
    if all(r["results"].get("projector_dense_bytes_per_rank") for g in omoe for r in g.runs):
        _errorbar(a4, xs, field(omoe, "projector_dense_bytes_per_rank", MIB), "gray", "projectors if dense",
                  marker="x", linestyle=":")
    a4.set(ylabel="MiB per rank (max over ranks)", title="Memory per rank vs M")
    a4.set_yscale("log")
    for ax in (a1, a2, a3, a4):
        _log_x(ax, xs, base=2)
        ax.set_xlabel("experts per MoE layer M")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Expert count scaling, s={omoe[0].config['skip_step']} ({_context(omoe + base)})", fontsize=9)
    _save(fig, path)
    rows = []
    for g, b in sel:
        for group in (b, g):
            n, omoe_row = len(group.runs), group.is_omoe
            rows.append([str(g.config["experts"]), str(g.config["ep_size"]), group.label,
                         fmt(group.score("dev"), scale, n=n), fmt(group.score("test"), scale, n=n),
                         fmt(group.variance(), sci=True, n=n), fmt(group.field("r_step_s"), digits=3, n=n),
                         fmt(group.field("o_step_s"), digits=3, n=n) if omoe_row else "–",
                         fmt(group.field("o_step_extra_s"), digits=3, n=n) if omoe_row else "–",
                         fmt(_o_step_ratio(group), n=n) if omoe_row else "–",
                         fmt(group.field("peak_rss_bytes_per_rank"), 1 / MIB, digits=0, n=n),
                         fmt(group.field("projector_bytes_per_rank"), 1 / MIB, digits=1, n=n) if omoe_row else "0",
                         fmt(group.field("projector_dense_bytes_per_rank"), 1 / MIB, digits=1, n=n) if omoe_row else "–"])
    return markdown_table(["M", "EP", "optimizer", f"dev {metric}{unit}", f"test {metric}{unit}",
                           "mean expert param variance", "R step s", "O step s", "O step extra s", "O/R",
                           "peak RSS MiB/rank", "projector MiB/rank", "projector MiB/rank if dense"], rows)


def plot_optimizers(groups: List[Group], metric: str, split: str, path: str) -> Optional[str]:
    slices = defaultdict(dict)
    for g in groups:
        base = baseline_of(groups, g) if g.is_omoe else None
        if base is not None:
            c = g.config
            slices[(c["experts"], c["ep_size"], c["skip_step"], c["alpha0"], c["lam"], c["tag"])].setdefault(
                c["base_optimizer"], (g, base))
    if not slices:
        return None
    key, sel = _prefer([({"experts": k[0], "skip_step": k[2]}, v) for k, v in slices.items()], len)
    names = sorted(sel, key=lambda n: ("adamw", "rmsprop", "adagrad", "sgd").index(n) if n in
                   ("adamw", "rmsprop", "adagrad", "sgd") else 9)
    scale, unit = metric_scale(metric)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(names) + 2), 3.8))
    width = 0.38
    for offset, which, color, label in ((-width / 2, 1, BASE_COLOR, "without OMoE"), (width / 2, 0, OMOE_COLOR, "with OMoE")):
        ms = [sel[n][which].score() for n in names]
        xs = [i + offset for i in range(len(names))]
        bars = ax.bar(xs, [m * scale for m, _ in ms], width, yerr=[s * scale for _, s in ms]
                      if any(s > 0 for _, s in ms) else None, color=color, capsize=3, label=label)
        ax.bar_label(bars, labels=[f"{m * scale:.1f}" if scale == 100 else f"{m:.3f}" for m, _ in ms], fontsize=7)
    lows = [sel[n][w].score()[0] * scale for n in names for w in (0, 1)]
    lo, hi = min(lows), max(lows)
    pad = max(hi - lo, 0.5 if scale == 100 else 0.005)
    ax.set_ylim(lo - 1.5 * pad, hi + 1.2 * pad)  # zoomed: the differences are small next to the scores
    ax.set_xticks(range(len(names)), names)
    ax.set(xlabel="base optimizer", ylabel=f"{split} {metric}{unit} (axis zoomed)",
           title=f"Base optimizers with and without OMoE\n(M={key['experts']}, s={key['skip_step']}; "
                 f"{_context([g for pair in sel.values() for g in pair])})")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    _save(fig, path)
    rows = [[n, fmt(sel[n][1].score(), scale, n=len(sel[n][1].runs)), fmt(sel[n][0].score(), scale, n=len(sel[n][0].runs)),
             fmt(_gain(*sel[n]), scale, n=len(sel[n][0].runs))] for n in names]
    return markdown_table(["base optimizer", f"plain {split} {metric}{unit}", f"OMoE {split} {metric}{unit}",
                           "OMoE gain" + (" (points)" if scale == 100 else "")], rows)


def plot_per_layer(groups: List[Group], path: str) -> Optional[str]:
    pairs = []
    for g in groups:
        base = baseline_of(groups, g) if g.is_omoe else None
        if base is not None and all(r["results"].get("diversity", {}).get("layers") for r in g.runs + base.runs):
            pairs.append(({"base_optimizer": g.config["base_optimizer"], "skip_step": g.config["skip_step"],
                           "experts": g.config["experts"]}, (g, base)))
    if not pairs:
        return None
    _, (g, base) = _prefer(pairs, lambda gb: len(gb[0].runs))
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    rows = []
    for col, weight in enumerate(("w1", "w2")):
        for row, (key, ylabel) in enumerate((("param_variance", "variance across experts\n(mean over positions; axis zoomed)"),
                                             ("percent_differing", "positions with |θi − θj| > 1e-3\n(% of expert pairs × positions)"))):
            ax = axes[row][col]
            vb, vo = base.layer_figures(weight, key), g.layer_figures(weight, key)
            layers = list(range(len(vb)))
            ax.bar([l - 0.2 for l in layers], vb, 0.4, color=BASE_COLOR, label=base.label)
            ax.bar([l + 0.2 for l in layers], vo, 0.4, color=OMOE_COLOR, label=g.label)
            ax.set_xticks(layers)
            ax.set(xlabel="MoE layer (0 = first)", ylabel=ylabel,
                   title=f"{'W1 = [W1|b1] (d_model→d_ff)' if weight == 'w1' else 'W2 = [W2|b2] (d_ff→d_model)'}: "
                         f"{'parameter variance' if key == 'param_variance' else 'parameters differing'}")
            ax.title.set_fontsize(9)
            if key == "param_variance":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
                lo = min(vb + vo)
                ax.set_ylim(lo * 0.9, max(vb + vo) * 1.05)  # zoomed: the between-run gap is small
            ax.grid(alpha=0.3, axis="y")
            for l in layers:
                rows.append([str(l), weight.upper(), "variance" if key == "param_variance" else "% differing",
                             f"{vb[l]:.3e}" if key == "param_variance" else f"{vb[l]:.2f}",
                             f"{vo[l]:.3e}" if key == "param_variance" else f"{vo[l]:.2f}",
                             (f"{100 * (vo[l] / vb[l] - 1):+.1f}% (relative)" if vb[l] else "–")
                             if key == "param_variance" else f"{vo[l] - vb[l]:+.2f} points"])
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Expert diversity per layer, {g.label} (s={g.config['skip_step']}) vs {base.label}, "
                 f"M={g.config['experts']} ({_context([g, base])})", fontsize=9)
    _save(fig, path)
    rows.sort(key=lambda r: (r[2], r[1], int(r[0])))
    return markdown_table(["layer", "weight", "figure", base.label, g.label, "OMoE vs baseline"], rows)


PLOTS = (
    ("skip_step.png", "Skip step s (paper Fig. 4)", plot_skip_step,
     "needs OMoE cells at >= 2 skip steps with the same experts, base optimizer, α0 and λ"),
    ("experts_gain.png", "Number of experts (paper Fig. 5)", plot_experts,
     "needs OMoE and plain cells at >= 2 expert counts with the same base optimizer and s"),
    ("experts_scaling.png", "Expert count scaling: score, variance, step time and memory per rank vs M",
     plot_experts_scaling, "needs OMoE and plain cells at >= 2 expert counts with the same base optimizer and s, "
     "whose results.json hold step timing and memory (r_step_s, o_step_s, peak_rss_bytes_per_rank, "
     "projector_bytes_per_rank; written by omoe_ds.train since it records them)"),
    ("optimizers.png", "Base optimizers with and without OMoE (paper Table VIII)", plot_optimizers,
     "needs an OMoE cell and the plain cell of its base optimizer"),
    ("per_layer_diversity.png", "Per-layer expert diversity, OMoE vs baseline (paper Fig. 3 / Tables I-II)", plot_per_layer,
     "needs an OMoE cell and the plain cell of its base optimizer, with per-layer diversity in results.json"),
)


def write_report(results_dir: str, out_dir: Optional[str] = None, dpi: int = 100, echo=print) -> dict:
    out_dir = out_dir or os.path.join(results_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    runs, failed = load_cells(results_dir)
    if not runs:
        raise SystemExit(f"{results_dir}: no finished cell (no valid cells/*/results.json) to report on")
    groups, metric, split = group_runs(runs)
    plt.rcParams.update({"savefig.dpi": dpi, "font.size": 8})
    md = [f"# Sweep report: {os.path.abspath(results_dir)}", "",
          f"{_context(groups)}. Primary metric: {metric}; mean ± sample std over seeds where a row has more than one. "
          "Mean expert param variance: per MoE layer, the variance of each [W|b] position across the experts, "
          "averaged over positions, W1 and W2, and layers.", "", main_table(groups, metric), ""]
    written, skipped = [], []
    for filename, title, plot, need in PLOTS:
        path = os.path.join(out_dir, filename)
        table = plot(groups, path) if plot is plot_per_layer else plot(groups, metric, split, path)
        if table is None:
            line = f"skipped {filename} ({title}): the results hold no data for it; it {need}"
            skipped.append(line)
            echo(f"[omoe_ds.report] {line}")
            if os.path.exists(path):
                os.remove(path)  # a stale plot from an earlier report would misdescribe these results
            continue
        written.append(path)
        md += [f"## {title}", "", f"![{title}]({filename})", "", table, ""]
    if skipped:
        md += ["## Plots skipped", ""] + [f"- {line}" for line in skipped] + [""]
    if failed:
        from .sweep import error_line
        md += ["## Failed cells", ""] + [f"- `{e['cell']}`: {e.get('error', 'failed')}: "
                                          f"`{error_line(e.get('log_tail') or [])[-300:]}`" for e in failed] + [""]
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    echo(f"[omoe_ds.report] {len(runs)} runs in {len(groups)} configurations -> {md_path}"
         + "".join(f"\n[omoe_ds.report] wrote {p}" for p in written))
    return {"markdown": md_path, "plots": written, "skipped": skipped, "failed": [e["cell"] for e in failed]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m omoe_ds.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir")
    p.add_argument("--out-dir", default=None, help="default: RESULTS_DIR/report")
    p.add_argument("--dpi", type=int, default=100)
    args = p.parse_args(argv)
    write_report(args.results_dir, args.out_dir, args.dpi)
    return 0


if __name__ == "__main__":
    sys.exit(main())
