"""Turn profile tables into short findings a researcher can act on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from actlab.analyze.head_roles import heads_by_role

BI_DROP = 0.02  # Block Influence under which a layer is a dropping candidate (ShortGPT)
ATTN_REDUNDANT_COS = 0.99  # cos(x, x + attn) above which the attention sublayer barely turns the stream
MASSIVE_FACTOR = 100.0  # max |x| over median |x| of the residual stream that counts as massive
SINK_MASS = 0.5  # first-token attention mass that makes a head a sink head
SPARSITY_EPS = 0.01
IDLE_EXPERT_LOAD = 0.1  # an expert routed a tenth of its balanced share of tokens or less is all but unused


@dataclass
class Finding:
    topic: str
    text: str


def _layers(layers: list[int]) -> str:
    """'layer 25' or 'layers 3-5, 9'."""
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {_ranges(layers)}"


def _ranges(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out, start, prev = [], None, None
    for x in sorted(layers):
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = x
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


def layer_findings(layers: pd.DataFrame) -> list[Finding]:
    out: list[Finding] = []
    if "block_influence" not in layers:
        return out
    bi = layers.dropna(subset=["block_influence"])
    low = bi[bi["block_influence"] < BI_DROP]["layer"].tolist()
    if low:
        verb = "has" if len(low) == 1 else "have"
        out.append(Finding("layers", f"{_layers(low)} {verb} Block Influence < {BI_DROP}: candidates for dropping "
                                     "(ShortGPT)"))
    lowest = bi.nsmallest(min(3, len(bi)), "block_influence")
    out.append(Finding("layers", "lowest Block Influence: " + ", ".join(
        f"layer {int(r.layer)} ({r.block_influence:.3f})" for r in lowest.itertuples())))
    if "cos_attn" in layers:
        quiet = layers[layers["cos_attn"] > ATTN_REDUNDANT_COS]["layer"].tolist()
        if quiet:
            out.append(Finding("layers", f"attention sublayers of {_layers(quiet)} change the residual "
                                         f"direction by less than cos {ATTN_REDUNDANT_COS}: attention-drop candidates"))
    if "logit_lens_loss" in layers and layers["logit_lens_loss"].notna().any():
        lens = layers.dropna(subset=["logit_lens_loss"])
        final = float(lens["logit_lens_loss"].iloc[-1])
        close = lens[lens["logit_lens_loss"] <= final * 1.1]
        first, last = int(close["layer"].iloc[0]), int(lens["layer"].iloc[-1])
        if first == last:  # the last layer's lens is the final loss itself: say what that means
            text = (f"the logit lens comes within 10% of the final loss ({final:.2f} nats) only at the last layer: "
                    "the prediction forms at the very end")
        else:
            later = f"layer {last} refines" if last == first + 1 else f"layers {first + 1}-{last} refine"
            text = (f"the logit lens comes within 10% of the final loss ({final:.2f} nats) at layer {first} "
                    f"(layers 0-{last}); {later} it")
        out.append(Finding("logit lens", text))
    return out


def massive_findings(layers: pd.DataFrame, top: pd.DataFrame) -> list[Finding]:
    if "resid_max_over_median" not in layers or top is None or not len(top):
        return []
    massive = layers[layers["resid_max_over_median"] > MASSIVE_FACTOR]
    if not len(massive):
        return [Finding("massive activations", f"no residual-stream value exceeds {MASSIVE_FACTOR:g}x the median "
                                               "magnitude of its layer")]
    peak = massive.loc[massive["resid_max_over_median"].idxmax()]
    resid = top[top["site"].str.endswith("resid_out")]
    big = resid[resid["layer"].isin(massive["layer"])]
    channels = big["channel"].value_counts().head(3).index.tolist()
    tokens = big["token"].value_counts().head(3).index.tolist()
    positions = big["position"].value_counts().head(3).index.tolist()
    largest = massive.loc[massive["resid_max_abs"].idxmax()]
    return [Finding("massive activations",
                    f"massive activations in {_layers(massive['layer'].astype(int).tolist())}: up to "
                    f"{largest['resid_max_abs']:.0f} at layer {int(largest['layer'])}, "
                    f"{peak['resid_max_over_median']:.0f}x the median |x| at layer {int(peak['layer'])}; "
                    f"channels {channels}, tokens {tokens}, positions {positions}")]


def attention_findings(heads: pd.DataFrame, sink_tokens: pd.DataFrame) -> list[Finding]:
    if heads is None or not len(heads):
        return []
    sinks = heads[heads["first_token_mass"] > SINK_MASS]
    out = [Finding("attention", f"{len(sinks)} of {len(heads)} heads put more than {SINK_MASS:.0%} of their "
                                f"attention on the first token (mean over all heads "
                                f"{heads['first_token_mass'].mean():.0%})")]
    ratio = heads["value_norm_first_ratio"].replace([np.inf, -np.inf], np.nan).dropna()
    if len(ratio):
        out.append(Finding("attention", f"value vectors at the first token are {ratio.median():.2f}x the norm of "
                                        "the other positions (median over heads)"))
    if sink_tokens is not None and len(sink_tokens):
        top = ", ".join(f"{t!r} ({c})" for t, c in zip(sink_tokens["token"].head(5), sink_tokens["count"].head(5)))
        out.append(Finding("attention",
                           f"later-token sinks (keys other than the first drawing > threshold mass): {top}"))
    return out


def neuron_findings(neurons: pd.DataFrame) -> list[Finding]:
    if neurons is None or not len(neurons):
        return []
    dead, on = int(neurons["dead"].sum()), int(neurons["always_on"].sum())
    per_layer = neurons.groupby("layer")["dead"].sum()
    worst = per_layer.idxmax() if dead else None
    text = f"{dead} of {len(neurons)} MLP neurons are dead and {on} always on"
    if worst is not None:
        text += f" (most dead neurons in layer {worst}: {int(per_layer.max())})"
    return [Finding("neurons", text)]


def sparsity_findings(sparsity: pd.DataFrame) -> list[Finding]:
    if sparsity is None or not len(sparsity):
        return []
    out = []
    near = sparsity[np.isclose(sparsity["eps"], SPARSITY_EPS, rtol=0.3)]
    for kind in ("down_in", "mlp_in", "attn_in", "o_in"):
        rows = near[near["kind"] == kind]
        if len(rows):
            out.append(Finding("sparsity", f"{kind}: median over layers {rows['fraction_below'].median():.0%} of "
                                           f"values below |x| < {rows['eps'].iloc[0]:.3g} "
                                           f"(range {rows['fraction_below'].min():.0%}-"
                                           f"{rows['fraction_below'].max():.0%})"))
    return out


def expert_findings(experts: pd.DataFrame) -> list[Finding]:
    """Routing balance of mixture-of-experts layers: the busiest expert and the all-but-unused ones."""
    if experts is None or not len(experts):
        return []
    busiest = experts.loc[experts["load"].idxmax()]
    idle = experts[experts["load"] <= IDLE_EXPERT_LOAD]
    per_layer = experts.groupby("layer")["load"].max()
    out = [Finding("experts", f"the busiest expert, {int(busiest['expert'])} of layer {int(busiest['layer'])}, takes "
                              f"{busiest['share']:.0%} of the tokens ({busiest['load']:.1f}x a balanced share); "
                              f"the busiest expert per layer is {per_layer.median():.1f}x balanced (median over "
                              f"{len(per_layer)} layers)")]
    if len(idle):
        names = ", ".join(f"L{int(r.layer)}.E{int(r.expert)}" for r in idle.head(8).itertuples())
        many = len(idle) > 1
        out.append(Finding("experts", f"{len(idle)} expert{'s' if many else ''} get{'' if many else 's'} at most "
                                      f"{IDLE_EXPERT_LOAD:.0%} of a balanced share: "
                                      f"{names}{' ...' if len(idle) > 8 else ''}"))
    return out


def findings(tables: dict[str, pd.DataFrame]) -> list[Finding]:
    layers = tables.get("layers", pd.DataFrame())
    return (layer_findings(layers) + massive_findings(layers, tables.get("top_activations"))
            + attention_findings(tables.get("heads"), tables.get("sink_tokens"))
            + neuron_findings(tables.get("neurons")) + sparsity_findings(tables.get("sparsity"))
            + expert_findings(tables.get("experts")))


# -- what to do next ---------------------------------------------------------------------------------------
@dataclass
class NextStep:
    text: str
    command: str = ""  # an actlab command line that tries it ("" when there is none yet)


def next_steps(tables: dict[str, pd.DataFrame], model: str) -> list[NextStep]:
    """Commands derived from the findings: a sparsity budget to try, layers to test for removal, what KV-cache
    compression and quantization must keep."""
    out: list[NextStep] = []
    flag = f"--model {model} "
    sparsity = tables.get("sparsity")
    if sparsity is not None and len(sparsity):
        rows = sparsity[(sparsity["kind"] == "down_in") & np.isclose(sparsity["eps"], SPARSITY_EPS, rtol=0.3)]
        if len(rows):
            budget = float(np.clip(np.floor(rows["fraction_below"].median() * 10) / 10, 0.2, 0.7))
            out.append(NextStep(f"a median {rows['fraction_below'].median():.0%} of MLP intermediates are near zero: "
                                f"try activation sparsity at {budget:.0%}, calibrated by loss",
                                f"actlab sparsify {flag}--method loss-aware --sparsity {budget:g} "
                                "--calib wikitext2:valid --eval wikitext2:test --save sparse.json"))
    layers = tables.get("layers", pd.DataFrame())
    if "block_influence" in layers and layers["block_influence"].notna().any():
        n = len(layers)
        count = max(1, round(n / 8))
        low = layers.nsmallest(count, "block_influence")["layer"].astype(int).tolist()
        which = (f"the {count} blocks with the lowest Block Influence ({_layers(sorted(low))}) are" if count > 1 else
                 f"the block with the lowest Block Influence ({_layers(low)}) is")
        out.append(NextStep(f"{which} the first to test for removal; compare ShortGPT's choice with one measured "
                            "by loss",
                            f"actlab layers {flag}--method shortgpt --budget 0.125 --save short.json && "
                            f"actlab layers {flag}--method joint --budget 0.125 --save joint.json && "
                            f"actlab eval {flag}--recipe short.json --recipe joint.json --tasks wikitext2,arc_easy "
                            "--limit 200"))
    if "cos_attn" in layers:
        quiet = layers[layers["cos_attn"] > ATTN_REDUNDANT_COS]["layer"].astype(int).tolist()
        if quiet:
            parts = ",".join(f"L{i}.attn" for i in quiet)
            out.append(NextStep(f"the attention of {_layers(quiet)} barely turns the stream: remove it and measure",
                                f"actlab layers {flag}--remove {parts} --save attn.json && actlab eval {flag}"
                                "--recipe attn.json --tasks wikitext2 --limit 40"))
    heads = tables.get("heads")
    if heads is not None and len(heads):
        sinks = heads[heads["first_token_mass"] > SINK_MASS]
        if len(sinks):
            out.append(NextStep(f"{len(sinks)} heads are attention sinks: a compressed KV cache must keep the first "
                                "token's keys and values (StreamingLLM's sink tokens)"))
    roles = {r["role"]: r for r in heads_by_role(tables)}
    if "retrieval" in roles and "streaming" in roles:
        keep = [f"L{layer}.H{head}" for layer, head in roles["retrieval"]["chosen"]]
        shown = ", ".join(keep[:6]) + (", ..." if len(keep) > 6 else "")
        out.append(NextStep(f"{roles['retrieval']['count']} of {roles['retrieval']['of']} heads copy from far context "
                            f"(retrieval heads{': ' + shown if keep else ''}) and {roles['streaming']['count']} "
                            "attend almost only to the first tokens and a recent window: a head-wise KV cache "
                            "keeps the whole context for the first and sinks + window for the second"))
    if "resid_max_over_median" in layers and (layers["resid_max_over_median"] > MASSIVE_FACTOR).any():
        out.append(NextStep("massive activations in the residual stream: weight quantization must keep the "
                            "channels the massive-activation table names at high precision, and activation "
                            "quantization must not clip them"))
    return out


def layer_summary(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per layer: MLP-input sparsity near zero, residual peak over median, sink heads, Block Influence
    and the attention sublayer's cosine."""
    layers = tables.get("layers", pd.DataFrame())
    if not len(layers):
        return pd.DataFrame()
    out = pd.DataFrame({"layer": layers["layer"].astype(int)})
    for column in ("block_influence", "cos_attn", "resid_max_over_median", "logit_lens_loss"):
        if column in layers:
            out[column] = layers[column].to_numpy()
    sparsity = tables.get("sparsity")
    if sparsity is not None and len(sparsity):
        rows = sparsity[(sparsity["kind"] == "down_in") & np.isclose(sparsity["eps"], SPARSITY_EPS, rtol=0.3)]
        out = out.merge(rows[["layer", "fraction_below"]].rename(columns={"fraction_below": "down_in_near_zero"}),
                        on="layer", how="left")
    heads = tables.get("heads")
    if heads is not None and len(heads):
        sinks = (heads["first_token_mass"] > SINK_MASS).groupby(heads["layer"]).sum().rename("sink_heads")
        out = out.merge(sinks.reset_index(), on="layer", how="left")
    experts = tables.get("experts")
    if experts is not None and len(experts):
        out = out.merge(experts.groupby("layer")["load"].max().rename("busiest_expert_load").reset_index(),
                        on="layer", how="left")
    return out
