"""The engine's GEMV kernels: the compiled C++ ones (csrc/sparse_gemv.cpp), or plain-torch equivalents.

Why C++/OpenMP (built on first use by torch.utils.cpp_extension, -O3 -march=native, sharing torch's OpenMP
pool): batch-1 GEMV is bound by memory traffic, so the kernel must stream the kept weight rows in place.
On this project's 2-core machine, measured by bench/gemv_kernels.py (docs/engine.md): torch.mv reads weights
at ~15 GB/s, the C++ dense kernel at ~35 GB/s, and the input-sparse kernel at 50% takes 0.49x the dense
kernel's time; gathering the kept rows with index_select first (what torch offers) is slower than dense.
A numba version would need its own threading runtime beside torch's and another dependency.
"""

from __future__ import annotations

import torch

from actlab import native


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TorchKernels:
    """Reference implementations (correct, slow): used when the C++ extension cannot be built."""

    @staticmethod
    def dense_gemv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.mv(w, x)

    @staticmethod
    def sparse_gemv(wt: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, threshold: float):
        score = x.abs() * scale if scale.numel() else x.abs()
        keep = torch.nonzero(score > threshold).flatten()
        return wt.index_select(0, keep).t().mv(x[keep]) if len(keep) else x.new_zeros(wt.shape[1]), len(keep)

    @staticmethod
    def indexed_gemv(wt: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        return wt.index_select(0, idx).t().mv(vals) if len(idx) else vals.new_zeros(wt.shape[1])

    @staticmethod
    def row_gemv(w: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return w.index_select(0, idx).mv(x)

    @staticmethod
    def decode_attention(q, k, v, k_cache, v_cache, pos: int, start: int, cos, sin, scaling: float,
                         softcap: float) -> torch.Tensor:
        """Rotary on q, k; write k, v into the layer's cache [kv, T, d] at pos; attend over [start, pos]."""
        if cos.numel():
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k_cache[:, pos] = k
        v_cache[:, pos] = v
        heads, kv = q.shape[0], k.shape[0]
        scores = torch.matmul(q.view(kv, heads // kv, -1), k_cache[:, start : pos + 1].transpose(1, 2)) * scaling
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        return torch.matmul(torch.softmax(scores, dim=-1), v_cache[:, start : pos + 1]).reshape(-1)

    @staticmethod
    def ragged_attention(q, k, v, kc, vc, slot_pos, offsets, lens, caps, pos: int, window: int, cos, sin,
                         scaling: float, softcap: float) -> torch.Tensor:
        """The C++ kernel's ragged cache step (see csrc/sparse_gemv.cpp), one head at a time."""
        if cos.numel():
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        heads, kv = q.shape[0], k.shape[0]
        out = []
        for h in range(kv):
            off, n = int(offsets[h]), int(lens[h])
            rows = slot_pos[off:off + n]
            stale = ((pos - rows) >= window).nonzero().flatten() if window > 0 else rows[:0]
            if len(stale):
                slot = off + int(stale[0])
            else:
                if n >= int(caps[h]):
                    raise RuntimeError("the ragged KV cache of a head is full")
                slot = off + n
                lens[h] += 1
            kc[slot], vc[slot], slot_pos[slot] = k[h], v[h], pos
        for h in range(heads):
            g = h // (heads // kv)
            off, n = int(offsets[g]), int(lens[g])
            scores = kc[off:off + n].mv(q[h]) * scaling
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)
            if window > 0:
                scores = scores.masked_fill((pos - slot_pos[off:off + n]) >= window, float("-inf"))
            out.append(torch.softmax(scores, 0) @ vc[off:off + n])
        return torch.cat(out)

    @staticmethod
    def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * w

    @staticmethod
    def int8_gemv(q: torch.Tensor, s: torch.Tensor, x: torch.Tensor):
        groups = s.shape[1]
        xg = x.view(groups, -1)
        parts = (q.float().view(q.shape[0], groups, -1) * xg).sum(-1)
        return (parts * s).sum(-1), (0.5 * s * xg.abs().sum(-1)).sum(-1)


def load_kernels(prefer_native: bool = True):
    kernels = native.load("sparse_gemv") if prefer_native else None
    return kernels if kernels is not None else TorchKernels()
