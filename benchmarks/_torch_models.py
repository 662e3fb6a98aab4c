"""CPU PyTorch copies of the benchmark models (``_models.py``), on identical weights.

Each copy is an ordinary ``torch.nn.Module`` on NCHW images (the layout
torchattacks and PyTorch users feed), written layer by layer as a PyTorch
user writes it: ``nn.Linear``, ``nn.Conv2d`` with ``padding=k // 2`` (JAX's
'SAME' for odd kernels at stride 1), ``F.max_pool2d(2, 2, ceil_mode=True)``
(bgeom's ceil-mode pooling; the same as 'VALID' on the even sizes here) and
the activation. The JAX models flatten NHWC feature maps, so the copy permutes
to NHWC before its first dense layer. Weights are copied, not retrained:
dense kernels (in, out) become ``weight`` (out, in); conv kernels HWIO become
OIHW.

:func:`check_logits` compares the copy's logits with the JAX model's on a
batch; the benchmarks refuse to time a copy that disagrees.

Imported by the benchmarks after they parse their options (it imports torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Largest accepted ``max |torch - jax| / max(1, max |jax|)`` over the logits of a batch.
LOGIT_TOLERANCE = 1e-5


class _Flatten(nn.Module):
    """NCHW -> (N, H*W*C) in NHWC order, as the JAX models flatten."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


class _Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2, 2, ceil_mode=True)


def _dense(kernel: np.ndarray, bias: np.ndarray) -> nn.Linear:
    layer = nn.Linear(kernel.shape[0], kernel.shape[1])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.array(kernel.T, np.float32)))
        layer.bias.copy_(torch.from_numpy(np.array(bias, np.float32)))
    return layer


def _conv(kernel: np.ndarray, bias: np.ndarray) -> nn.Conv2d:
    kh, kw, cin, cout = kernel.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError("only odd kernels have a symmetric 'SAME' padding")
    layer = nn.Conv2d(cin, cout, (kh, kw), padding=(kh // 2, kw // 2))
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.array(kernel.transpose(3, 2, 0, 1), np.float32)))
        layer.bias.copy_(torch.from_numpy(np.array(bias, np.float32)))
    return layer


def torch_copy(layers: list[tuple]) -> nn.Module:
    """The PyTorch module computing ``layers`` (``BenchModel.layers``) on NCHW input."""
    modules: list[nn.Module] = []
    for op, *arrays in layers:
        if op == "dense":
            modules.append(_dense(*arrays))
        elif op == "conv":
            modules.append(_conv(*arrays))
        elif op == "relu":
            modules.append(nn.ReLU())
        elif op == "tanh":
            modules.append(nn.Tanh())
        elif op == "pool":
            modules.append(_Pool())
        elif op == "flatten":
            modules.append(_Flatten())
        else:
            raise ValueError(f"unknown layer {op!r}")
    return nn.Sequential(*modules).eval()


def to_nchw(x: np.ndarray) -> torch.Tensor:
    """NHWC NumPy images as a contiguous NCHW float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    """The inverse of :func:`to_nchw`."""
    return np.ascontiguousarray(x.detach().numpy().transpose(0, 2, 3, 1))


def check_logits(module: nn.Module, jax_logits: np.ndarray, x: np.ndarray) -> dict[str, Any]:
    """Compare ``module``'s logits on NHWC images ``x`` with ``jax_logits``.

    Returns the largest absolute difference, it relative to ``max(1, max |logit|)``,
    whether the predicted labels agree everywhere, and ``ok``.
    """
    with torch.no_grad():
        ours = module(to_nchw(x)).numpy()
    jax_logits = np.asarray(jax_logits)
    diff = float(np.max(np.abs(ours - jax_logits)))
    scale = max(1.0, float(np.max(np.abs(jax_logits))))
    labels = bool(np.all(ours.argmax(-1) == jax_logits.argmax(-1)))
    return {
        "max_abs_difference": diff,
        "relative_difference": diff / scale,
        "labels_agree": labels,
        "tolerance": LOGIT_TOLERANCE,
        "ok": bool(diff / scale <= LOGIT_TOLERANCE and labels),
    }
