"""A closed-form repair of a removed block or sublayer: what it added, predicted linearly from what it read.

A removed part f is replaced by g(u) = (u - mu_u) A + mu_y, fitted on calibration tokens by ridge regression
of the part's output y = f(u) on its input u (a sublayer: its normed input attn_in / mlp_in -> its output
o_out / down_out; a block: its residual input -> its update resid_out - resid_in):

    A = (Uc^T Uc + lam I)^-1 Uc^T Yc,   Uc = U - mu_u, Yc = Y - mu_y,   lam = ridge * tr(Uc^T Uc) / d.

The constant alone (A = 0) is mean ablation, which keeps the part's average contribution that zeroing throws
away. A full d x d map would cost a sizeable share of what removing the part saves, so A is cut to rank r by
reduced-rank regression (the rank-r A minimising the squared error is A V_r V_r^T, V_r the top right singular
vectors of the fitted values Uc A; Reinsel & Velu 1998) and stored as two factors: 2 d r + 2 d parameters,
counted against the budget. LLM-Streamline trains a replacement layer; this one is fitted in closed form.
"""

from __future__ import annotations

from typing import Any

import torch

KINDS = ("none", "mean", "linear")
TENSORS = ("mean_in", "down", "up", "bias")


class RepairMoments:
    """The sums a repair is fitted from (count, sum u, sum y, sum u u^T, sum u y^T), streamed and mergeable:
    the fit needs no stored activations. Float64."""

    def __init__(self) -> None:
        self.n = 0
        self.su = self.sy = self.suu = self.suy = None

    def add(self, u: torch.Tensor, y: torch.Tensor) -> None:
        """u [..., d_in], y [..., d_out]: one token per row after flattening."""
        u = u.reshape(-1, u.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        parts = (u.sum(0), y.sum(0), u.T @ u, u.T @ y)
        if self.su is None:
            self.su, self.sy, self.suu, self.suy = parts
        else:
            for mine, new in zip((self.su, self.sy, self.suu, self.suy), parts):
                mine.add_(new)
        self.n += u.shape[0]

    def sum_over_ranks(self, calib: Any, d_in: int, d_out: int) -> None:
        """Add every data-parallel rank's sums to these (a rank that saw no token adds zeros)."""
        if not calib.world.distributed:
            return
        if self.su is None:
            self.su, self.sy = torch.zeros(d_in, dtype=torch.float64), torch.zeros(d_out, dtype=torch.float64)
            self.suu = torch.zeros(d_in, d_in, dtype=torch.float64)
            self.suy = torch.zeros(d_in, d_out, dtype=torch.float64)
        n = torch.tensor(self.n, dtype=torch.float64)
        calib.reduce(self.su, self.sy, self.suu, self.suy, n)
        self.n = int(n)

    def fit(self, kind: str = "linear", rank: int = 32, ridge: float = 1e-2) -> dict[str, torch.Tensor]:
        """The repair's tensors (float32): mean_in [d_in], down [d_in, r], up [r, d_out], bias [d_out]."""
        if kind not in KINDS[1:]:
            raise ValueError(f"repair kind must be one of {', '.join(KINDS[1:])}, got {kind!r}")
        mu_u, mu_y = self.su / self.n, self.sy / self.n
        d_in, d_out = self.suy.shape
        r = 0 if kind == "mean" else min(rank, d_in, d_out)
        down, up = torch.zeros(d_in, r, dtype=torch.float64), torch.zeros(r, d_out, dtype=torch.float64)
        if r > 0:
            gram = self.suu - self.n * torch.outer(mu_u, mu_u)  # Uc^T Uc
            cross = self.suy - self.n * torch.outer(mu_u, mu_y)  # Uc^T Yc
            lam = ridge * torch.trace(gram).clamp_min(1e-30) / d_in
            a = torch.linalg.solve(gram + lam * torch.eye(d_in, dtype=gram.dtype), cross)
            fitted = a.T @ gram @ a  # (Uc A)^T (Uc A): its top eigenvectors are the top right singular vectors
            _, vecs = torch.linalg.eigh((fitted + fitted.T) / 2)
            v = vecs[:, -r:].flip(1)  # [d_out, r], largest first
            down, up = a @ v, v.T
        return {"mean_in": mu_u.float(), "down": down.float(), "up": up.float(), "bias": mu_y.float()}


def fit_repair(u: torch.Tensor, y: torch.Tensor, kind: str = "linear", rank: int = 32,
               ridge: float = 1e-2) -> dict[str, torch.Tensor]:
    """The repair of one part from its inputs u [tokens, d_in] and outputs y [tokens, d_out]."""
    moments = RepairMoments()
    moments.add(u, y)
    return moments.fit(kind, rank, ridge)


def apply_repair(u: torch.Tensor, repair: dict[str, torch.Tensor]) -> torch.Tensor:
    """g(u) for u [..., d], in u's dtype."""
    dtype = u.dtype
    x = u.float() - repair["mean_in"].to(u.device)
    out = repair["bias"].to(u.device)
    if repair["down"].shape[1]:
        out = (x @ repair["down"].to(u.device)) @ repair["up"].to(u.device) + out
    else:
        out = out.expand(*u.shape[:-1], out.shape[-1])
    return out.to(dtype)


class PreparedRepair:
    """apply_repair for a decode loop, which calls it once per token: the float32 tensors made once and the input
    mean folded into the bias, g(u) = (u D) U + (b - mu_u D U), two matrix-vector products for one token."""

    def __init__(self, repair: dict[str, torch.Tensor]):
        down, up, bias = (repair[k].detach().float() for k in ("down", "up", "bias"))
        self.rank = down.shape[1]
        self.down_t, self.up_t = down.t().contiguous(), up.t().contiguous()  # [r, d_in], [d_out, r]
        self.bias = bias - (repair["mean_in"].float() @ down) @ up if self.rank else bias

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        x = u.float()
        if not self.rank:
            out = self.bias.expand(*u.shape[:-1], self.bias.shape[-1])
        elif x.dim() == 1:
            out = torch.addmv(self.bias, self.up_t, torch.mv(self.down_t, x))
        else:
            out = (x @ self.down_t.t()) @ self.up_t.t() + self.bias
        return out.to(u.dtype)


def repair_params(repair: dict[str, torch.Tensor]) -> int:
    return sum(int(repair[name].numel()) for name in TENSORS)
