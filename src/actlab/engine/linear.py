"""Engine projections: one weight layout per use, the recipe's rule applied inside the kernel."""

from __future__ import annotations

import torch

from actlab.models.adapter import LinearView
from actlab.transforms.sparsity.recipe import MaskRule
from actlab.transforms.sparsity.rules import token_rms


class EngineLinear:
    """A projection for batch-1 decoding.

    Dense: W [out, in] and a dot per output row. With an input rule: W^T [in, out], and the kernel keeps
    channel i when |x_i| * scale_i > cutoff, reading only kept rows. The cutoff is the rule's threshold, or
    per token the k-th largest score (topk), the threshold times the scores' RMS (relative) or mean + z*std of
    the scores (gaussian), computed here."""

    def __init__(self, view: LinearView, rule: MaskRule | None, kernels, bias_extra: list[float] | None = None):
        w = view.weight().detach().float()
        self.kernels = kernels
        self.rule = rule if rule is not None and rule.source == "input" else None
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        if self.rule is None:
            self.w = w.contiguous()
        else:
            self.wt = w.t().contiguous()
            self.scale = rule.scale_tensor() if rule.scale is not None else torch.empty(0)
        self.fixed_cutoff = self.rule.threshold if self.rule is not None and self.rule.kind == "threshold" else None
        b = view.bias()
        bias = None if b is None else b.detach().float().clone()
        if bias_extra:
            extra = torch.tensor(bias_extra, dtype=torch.float32)
            bias = extra if bias is None else bias + extra
        self.bias = bias
        self.kept = 0
        self.seen = 0

    def bytes_read(self, kept_fraction: float = 1.0) -> float:
        return self.in_features * self.out_features * 4 * kept_fraction

    def cutoff(self, x: torch.Tensor) -> float:
        rule = self.rule
        if rule.kind == "threshold":
            return rule.threshold
        score = x.abs() * self.scale if self.scale.numel() else x.abs()
        if rule.kind == "topk":
            k = min(len(score), max(0, round(rule.keep * len(score))))
            if k == len(score):
                return -1.0
            if k == 0:
                return float("inf")
            return float(score.kthvalue(len(score) - k).values)
        if rule.kind == "relative":
            return float(rule.threshold * token_rms(score))
        return float(score.mean() + rule.z * score.std())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # called ~200 times per token: no helper calls on the path (each Python call is ~0.5 us)
        if self.rule is None:
            y = self.kernels.dense_gemv(self.w, x)
        else:
            cutoff = self.fixed_cutoff if self.fixed_cutoff is not None else self.cutoff(x)
            y, kept = self.kernels.sparse_gemv(self.wt, x, self.scale, cutoff)
            self.kept += kept
            self.seen += self.in_features
        return y if self.bias is None else y + self.bias


class ActSparseMLP:
    """A gated (or plain) MLP under an activation rule (CATS, CHESS): the gate runs dense, the neurons whose
    |act| * scale falls below the threshold skip their up-projection row and down-projection column."""

    def __init__(self, gate: EngineLinear, up: LinearView | None, down: LinearView, act_fn, rule: MaskRule, kernels):
        self.gate, self.act_fn, self.kernels = gate, act_fn, kernels
        self.threshold = rule.threshold
        self.scale = rule.scale_tensor()
        self.w_up = None if up is None else up.weight().detach().float().contiguous()
        self.b_up = None if up is None or up.bias() is None else up.bias().detach().float()
        self.wt_down = down.weight().detach().float().t().contiguous()
        self.b_down = None if down.bias() is None else down.bias().detach().float()
        self.kept = 0
        self.seen = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act_fn(self.gate(x))
        score = act.abs() * self.scale if self.scale is not None else act.abs()
        idx = torch.nonzero(score > self.threshold).flatten()
        self.kept += len(idx)
        self.seen += len(act)
        h = act[idx]
        if self.w_up is not None:
            up = self.kernels.row_gemv(self.w_up, x, idx)
            h = h * (up if self.b_up is None else up + self.b_up[idx])
        y = self.kernels.indexed_gemv(self.wt_down, idx, h.contiguous())
        return y if self.b_down is None else y + self.b_down
