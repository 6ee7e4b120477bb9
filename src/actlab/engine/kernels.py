"""The engine's GEMV kernels: the compiled C++ ones (csrc/sparse_gemv.cpp), or plain-torch equivalents.

Why C++/OpenMP (built on first use by torch.utils.cpp_extension, -O3 -march=native, sharing torch's OpenMP
pool): batch-1 GEMV is bound by memory traffic, so the kernel must stream the kept weight rows in place.
On this project's 2-core machine, measured by bench/gemv_kernels.py: torch.mv reads ~5 GB/s, the C++
dense kernel ~10 GB/s, and the input-sparse kernel at 50% runs in half the dense kernel's time; gathering
the kept rows with index_select first (what torch offers) is several times *slower* than dense.
A numba version would need its own threading runtime beside torch's and another dependency.
"""

from __future__ import annotations

import torch

from actlab import native


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
    def int8_gemv(q: torch.Tensor, s: torch.Tensor, x: torch.Tensor):
        groups = s.shape[1]
        xg = x.view(groups, -1)
        parts = (q.float().view(q.shape[0], groups, -1) * xg).sum(-1)
        return (parts * s).sum(-1), (0.5 * s * xg.abs().sum(-1)).sum(-1)


def load_kernels(prefer_native: bool = True):
    kernels = native.load("sparse_gemv") if prefer_native else None
    return kernels if kernels is not None else TorchKernels()
