"""Exact greedy token selection that reads a quarter of the LM head.

The LM head is the largest single read of a decode step (SmolLM2: 113 MB of 538 MB in float32). An int8
copy with one scale per 64 weights, multiplied by the hidden state quantized per group to int16 (exact
integer group sums, see int8_gemv in csrc/sparse_gemv.cpp), gives approximate logits a_j and a rigorous
bound e_j on their error (|w - s*round(w/s)| <= s/2 per weight and |x - sx*round(x/sx)| <= sx/2 per input,
so |logit_j - a_j| <= sum_g s_jg (||h_g||_1 / 2 + 127 * 64 * sx_g / 2)). Only tokens whose interval
[a_j - e_j, a_j + e_j] reaches the best lower bound can be the argmax; they are re-scored exactly in
float32. The result is the argmax of the float32 logits - the same token as a full float32 head - while
streaming ~1/4 of the bytes. Soft-capping (tanh) is monotone and does not change the argmax.
"""

from __future__ import annotations

import torch

GROUP = 64


class ExactArgmaxHead:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels, group: int = GROUP):
        w = weight.detach().float().contiguous()
        while w.shape[1] % group:  # the largest group size <= GROUP that divides the hidden size
            group -= 1
        self.weight, self.bias, self.kernels = w, None if bias is None else bias.detach().float(), kernels
        g = w.view(w.shape[0], -1, group)
        scale = g.abs().amax(-1).clamp_min(1e-30) / 127.0
        self.q = torch.round(g / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).view_as(w).contiguous()
        self.scale = scale.float().contiguous()
        self.last_candidates = 0

    def bytes_read(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def argmax(self, h: torch.Tensor) -> int:
        approx, err = self.kernels.int8_gemv(self.q, self.scale, h)
        if self.bias is not None:
            approx = approx + self.bias
        # float32 rounding of the int8 dot products themselves: a generous relative margin on top of the bound
        err = err * (1 + 1e-4) + 1e-6 * (approx.abs() + 1.0)
        lower = approx - err
        candidates = torch.nonzero(approx + err >= lower.max()).flatten()
        self.last_candidates = len(candidates)
        exact = self.weight.index_select(0, candidates).mv(h)
        if self.bias is not None:
            exact = exact + self.bias[candidates]
        return int(candidates[int(torch.argmax(exact))])
