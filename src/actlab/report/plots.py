"""Report figures: matplotlib (Agg) -> PNG bytes. One function per figure; each takes the profile tables."""

from __future__ import annotations

import io
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from actlab.probe.stats.frequency import middle_frequency_column  # noqa: E402

SPARSITY_KINDS = ("attn_in", "o_in", "mlp_in", "down_in")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _layer_axis(ax) -> None:
    """Layers are whole numbers: integer ticks only (Gemma's 18 layers otherwise get 2.5, 7.5, ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")


def _depth_colors(n: int):
    return plt.cm.viridis(np.linspace(0, 0.95, max(n, 1)))


def sparsity_vs_eps(t: dict[str, pd.DataFrame]) -> bytes:
    s = t["sparsity"]
    kinds = [k for k in SPARSITY_KINDS if k in set(s["kind"])] or sorted(set(s["kind"]))[:4]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.4), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = s[s["kind"] == kind]
        layers = sorted(rows["layer"].dropna().unique())
        for color, layer in zip(_depth_colors(len(layers)), layers):
            r = rows[rows["layer"] == layer]
            ax.plot(r["eps"], r["fraction_below"], color=color, lw=1)
        ax.set_xscale("log")
        ax.set_title(kind)
        ax.set_xlabel("eps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction |x| < eps")
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, max(len(layers) - 1, 1)))
    fig.colorbar(sm, ax=axes[0].tolist(), label="layer", fraction=0.02)
    return _png(fig)


RELATIVE_EPS = 0.1  # the per-layer sparsity plot's threshold, as a fraction of each site's RMS


def fraction_below_relative(sparsity: pd.DataFrame, sites: pd.DataFrame, rel: float = RELATIVE_EPS) -> pd.DataFrame:
    """Per site: the fraction of |x| below rel x the site's RMS, interpolated in log(eps) on the site's
    fraction-below curve (a threshold that means the same at every layer, whatever its scale)."""
    rows = []
    rms = sites.set_index("site")["rms"]
    for site, curve in sparsity.groupby("site"):
        if site not in rms or not rms[site] > 0 or pd.isna(curve["layer"].iloc[0]):
            continue
        curve = curve.sort_values("eps")
        eps = rel * float(rms[site])
        value = float(np.interp(np.log(eps), np.log(curve["eps"].to_numpy()), curve["fraction_below"].to_numpy()))
        rows.append({"site": site, "layer": int(curve["layer"].iloc[0]), "kind": curve["kind"].iloc[0],
                     "fraction_below": value})
    return pd.DataFrame(rows)


def sparsity_per_layer(t: dict[str, pd.DataFrame]) -> bytes:
    rel = fraction_below_relative(t["sparsity"], t["sites"])
    kinds = [k for k in SPARSITY_KINDS if k in set(rel["kind"])] if len(rel) else []
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for kind in kinds:
        r = rel[rel["kind"] == kind].sort_values("layer")
        ax.plot(r["layer"], r["fraction_below"], marker="o", ms=3, label=kind)
    _layer_axis(ax)
    ax.set_ylabel(f"fraction |x| < {RELATIVE_EPS:g} x RMS")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def neuron_frequency(t: dict[str, pd.DataFrame]) -> bytes:
    n = t["neurons"]
    col = middle_frequency_column(n.columns)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    a.hist(n[col], bins=50, color="#4c72b0")
    a.set_yscale("log")
    a.set_xlabel(f"activation frequency (|a| > {col.removeprefix('freq_')})")
    a.set_ylabel("neurons")
    a.set_title("MLP neuron activation frequency")
    per = n.groupby("layer")[["dead", "always_on"]].sum()
    b.bar(per.index - 0.2, per["dead"], width=0.4, label="dead", color="#c44e52")
    b.bar(per.index + 0.2, per["always_on"], width=0.4, label="always on", color="#55a868")
    _layer_axis(b)
    b.set_ylabel("neurons")
    b.set_title("dead / always-on neurons per layer")
    b.legend()
    return _png(fig)


def massive_activations(t: dict[str, pd.DataFrame]) -> bytes:
    layers = t["layers"]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.plot(layers["layer"], layers["resid_max_abs"], "o-", label="max |x|", color="#c44e52")
    ax.plot(layers["layer"], layers["resid_median_abs"], "o-", label="median |x|", color="#4c72b0")
    ax.set_yscale("log")
    _layer_axis(ax)
    ax.set_ylabel("|x| (log)")
    ax.set_title("residual stream magnitude (block output)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def attention_sinks(t: dict[str, pd.DataFrame]) -> bytes:
    h = t["heads"]
    mass = h.pivot(index="layer", columns="head", values="first_token_mass")
    ent = h.pivot(index="layer", columns="head", values="entropy")
    fig, axes = plt.subplots(1, 2, figsize=(11, max(3.0, 0.22 * len(mass) + 1.2)))
    for ax, m, title, cmap, scale in ((axes[0], mass, "attention mass on first token", "magma", (0.0, 1.0)),
                                      (axes[1], ent, "attention entropy (nats)", "viridis", (None, None))):
        # the mass on a fixed 0-1 scale, so that two models' heatmaps compare by eye
        im = ax.imshow(m.values, aspect="auto", cmap=cmap, origin="lower", vmin=scale[0], vmax=scale[1])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    return _png(fig)


def head_roles(t: dict[str, pd.DataFrame]) -> bytes:
    """One layer x head heatmap per role, each on a fixed 0-1 scale (two models compare by eye)."""
    from actlab.analyze.head_roles import ROLES, role_scores

    scores = role_scores(t)
    roles = [r for r in ROLES if r in scores]
    layers = scores["layer"].nunique()
    fig, axes = plt.subplots(1, len(roles), figsize=(3.6 * len(roles), max(3.0, 0.2 * layers + 1.4)), squeeze=False,
                             layout="constrained")
    for ax, role in zip(axes[0], roles):
        grid = scores.pivot(index="layer", columns="head", values=role)
        im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="magma", origin="lower", vmin=0, vmax=1)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{role}: {ROLES[role][1].replace('_', ' ')}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
    return _png(fig)


def layer_redundancy(t: dict[str, pd.DataFrame]) -> bytes:
    layers = t["layers"]
    x = layers["layer"].to_numpy()
    fig, ax = plt.subplots(figsize=(9, 3.4))
    ax.bar(x - 0.27, layers["block_influence"], width=0.27, label="block influence (1 - cos in/out)")
    ax.bar(x, 1 - layers["cos_attn"], width=0.27, label="1 - cos(x, x+attn)")
    ax.bar(x + 0.27, 1 - layers["cos_mlp"], width=0.27, label="1 - cos(x, x+mlp)")
    from actlab.analyze.findings import BI_DROP

    ax.axhline(BI_DROP, color="#c44e52", lw=1, ls=":", label=f"drop candidate below {BI_DROP}")
    ax.set_yscale("log")
    _layer_axis(ax)
    ax.set_ylabel("1 - cosine (log)")
    ax.set_title("layer and sublayer redundancy (lower = more redundant)")
    ax.legend(fontsize=8)
    return _png(fig)


def layer_importance(t: dict[str, pd.DataFrame]) -> bytes:
    """Gromov's angular distance between depths l and l+n (the cheapest span of n blocks is the lowest cell of
    row n), and where the run holds measured losses, each cheap metric against the measured loss increase."""
    from actlab.analyze.importance import CHEAP, KIND_NAMES, MEASURED, agreement, metric_columns, part_metrics

    angular = t["angular_distance"]
    parts = part_metrics(t)
    rho = agreement(parts)
    pairs = [(kind, metric) for kind in CHEAP for metric in metric_columns(parts, kind) if metric != MEASURED
             and MEASURED in metric_columns(parts, kind)]
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    fig, axes = plt.subplots(1, 1 + len(pairs), figsize=(5.2 + 3.4 * len(pairs), 3.8), squeeze=False,
                             layout="constrained")
    ax = axes[0][0]
    grid = angular.pivot(index="span", columns="start", values="angular_distance").sort_index()
    image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", origin="lower", cmap="viridis",
                      extent=(grid.columns.min() - 0.5, grid.columns.max() + 0.5, grid.index.min() - 0.5,
                              grid.index.max() + 0.5))
    fig.colorbar(image, ax=ax, label="angular distance / pi")
    _layer_axis(ax)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("first block removed (l)")
    ax.set_ylabel("blocks removed (n)")
    ax.set_title("angular distance d(l, l+n)")
    for k, (ax, (kind, metric)) in enumerate(zip(axes[0][1:], pairs)):
        rows = parts[(parts["kind"] == kind)].dropna(subset=[metric, MEASURED])
        ax.scatter(rows[metric], rows[MEASURED], s=18)
        for layer, x, y in zip(rows["layer"], rows[metric], rows[MEASURED]):
            ax.annotate(str(layer), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        value = rho[(rho["kind"] == kind) & (rho["metric"] == metric) & (rho["against"] == MEASURED)]["spearman"]
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        ax.set_xlabel(f"{metric} (log)")
        if k == 0:
            ax.set_ylabel("measured loss increase (layer numbers marked)")
        ax.set_title(f"{KIND_NAMES[kind]}: rho {float(value.iloc[0]):.2f}" if len(value) else KIND_NAMES[kind])
        ax.grid(alpha=0.3)
    return _png(fig)


def logit_lens(t: dict[str, pd.DataFrame]) -> bytes:
    layers = t["layers"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    if "logit_lens_loss" in layers:
        a.plot(layers["layer"], layers["logit_lens_loss"], "o-")
        lens = layers["logit_lens_loss"].dropna()
        if len(lens):
            a.axhline(float(lens.iloc[-1]), color="#55a868", lw=1, ls=":", label="final loss")
        model = t.get("model")  # the architecture row the report adds (vocab_size)
        if model is not None and "vocab_size" in model and len(model):
            a.axhline(float(np.log(model["vocab_size"].iloc[0])), color="#c44e52", lw=1, ls=":",
                      label="uniform ln|V|")
        a.legend(fontsize=8)
    else:
        a.text(0.5, 0.5, "logit lens not collected", ha="center", va="center", transform=a.transAxes)
    _layer_axis(a)
    a.set_ylabel("next-token loss (nats)")
    a.set_title("logit lens")
    a.grid(alpha=0.3)
    b.plot(layers["layer"], layers["hidden_rms"], "o-", label="hidden RMS")
    _layer_axis(b)
    b.set_yscale("log")
    b.set_ylabel("hidden RMS (log)")
    b2 = b.twinx()
    b2.plot(layers["layer"], layers["delta_ratio_mean"], "s--", color="#c44e52", label="||dh|| / ||h||")
    b2.set_ylabel("relative update ||dh|| / ||h||")
    b.set_title("depth profile: hidden RMS and relative update")
    b.legend(loc="upper left")
    b2.legend(loc="upper right")
    return _png(fig)


# figure key -> (title, drawing function, what it needs: a table, or "table.column" for one of its columns)
FIGURES: dict[str, tuple[str, Callable[[dict[str, pd.DataFrame]], bytes], tuple[str, ...]]] = {
    "sparsity": ("Activation sparsity vs eps, per layer", sparsity_vs_eps, ("sparsity",)),
    "sparsity_layers": (f"Which layers are sparse: values below {RELATIVE_EPS:g} x the site's RMS", sparsity_per_layer,
                        ("sparsity", "sites.rms")),
    "neurons": ("MLP neuron activation frequency", neuron_frequency, ("neurons",)),
    "massive": ("Massive activations", massive_activations, ("layers.resid_max_abs", "layers.resid_median_abs")),
    "sinks": ("Attention sinks and entropy (layer x head)", attention_sinks, ("heads",)),
    "roles": ("Head roles (layer x head): sink, streaming, retrieval, induction", head_roles, ("heads",)),
    "redundancy": ("Layer redundancy", layer_redundancy, ("layers.block_influence",)),
    "importance": ("Layer importance: angular distance and measured cost", layer_importance,
                   ("angular_distance.angular_distance",)),
    "lens": ("Logit lens and depth profile", logit_lens, ("layers.hidden_rms", "layers.delta_ratio_mean")),
}


def missing(tables: dict[str, pd.DataFrame], needs: tuple[str, ...]) -> list[str]:
    """What of `needs` the tables lack (a run of some sites only has some tables and columns)."""
    out = []
    for need in needs:
        table, _, column = need.partition(".")
        frame = tables.get(table)
        if frame is None or not len(frame) or (column and (column not in frame or frame[column].isna().all())):
            out.append(need)
    return out
