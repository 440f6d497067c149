"""CPU sampling speed: weights packed once per generate() call (`packed_weights`) and a GELU without oneDNN.
The float16 / int8 / int4 weight copies of `RQTransformer.quantized_for_cpu()` are in cpu_weights.py.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn as nn
import torch.nn.functional as F

PACK_MIN_ROWS = 4  # fewer rows: MKL's packed GEMM is slower than its plain one
# generate()'s packed weights for the row count it samples: (rows, {id(nn.Linear): packed weight}) or None.
# A context variable, so that concurrent generate() calls (threads) each see their own.
_PACKED: ContextVar[tuple[int, dict] | None] = ContextVar("rqtransformer_packed_weights", default=None)


@functools.cache
def mkl_packing_available() -> bool:
    """True when this torch build has MKL's packed-weight float32 GEMM (x86 builds)."""
    try:
        w = torch.zeros(2, 2)
        torch.ops.mkl._mkl_linear(torch.zeros(1, 2), torch.ops.mkl._mkl_reorder_linear_weight(w, 1), w, None, 1)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@contextmanager
def packed_weights(model: nn.Module, rows: int):
    """While active in this context, `linear(m, x)` multiplies x [rows, in] by m's weight packed once by MKL.

    Why: a sampling step multiplies a few rows by every weight matrix, and plain sgemm re-packs the whole
    weight into its kernel layout on every call. Packing each weight once per generate() call (what
    inductor's CPU freezing does for float32 linears) skips that. The same float32 arithmetic; results differ
    from F.linear in the last bits at most. Only for float32 models on CPU with MKL and at least PACK_MIN_ROWS
    rows; otherwise it does nothing.
    """
    packs = None
    if rows >= PACK_MIN_ROWS and mkl_packing_available():
        with torch.no_grad():
            packs = {id(m): torch.ops.mkl._mkl_reorder_linear_weight(m.weight, rows) for m in model.modules()
                     if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32}
    token = _PACKED.set((rows, packs) if packs else None)
    try:
        yield
    finally:
        _PACKED.reset(token)


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """module(x) for x [..., in]; inside packed_weights for x's row count, through the packed weight."""
    state = None if torch.compiler.is_compiling() else _PACKED.get()
    if state is not None and x.numel() == state[0] * x.shape[-1] and x.dtype == torch.float32 \
            and not torch.is_grad_enabled():
        packed = state[1].get(id(module))
        if packed is not None:
            return torch.ops.mkl._mkl_linear(x, packed, module.weight, module.bias, state[0])
    return module(x)


def native_gelu(x: torch.Tensor) -> torch.Tensor:
    """F.gelu of x [B, n] on torch's own kernel. For contiguous float32 inputs torch calls oneDNN,
    whose per-call setup costs more than the GELU of one token's [B, 4*dim]. A non-contiguous view of the
    same memory takes the native kernel, whose output keeps that layout, so the result reads back as [B, n];
    it differs from oneDNN's in the last few bits at most."""
    B, n = x.shape
    if n % 2 or not x.is_contiguous():  # (non-contiguous inputs take the native kernel anyway)
        return F.gelu(x)
    return F.gelu(x.as_strided((B, n // 2, 2), (n, 1, n // 2))).as_strided((B, n), (n, 1))
