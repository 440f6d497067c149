"""CPU sampling speed: weights packed once per generate() call (`packed_weights`), float16 weights
(`RQTransformer.quantized_for_cpu()`) and a GELU without oneDNN.

`quantized_for_cpu()` returns a copy whose linear layers multiply float32 activations by packed float16
weights (fbgemm, float32 accumulation).

Why: a sampling step multiplies one token (or a few rows) by every weight matrix, so on CPU it is bound by
reading the weights, not by arithmetic; float16 weights halve those reads (bench.sampling_speed gives the
figures). Weights stored as float16 (the bundled model's) are exact in float16, so the copy samples the same
codes; other weights are rounded (relative error <= 2^-11), so samples can drift from the float32 model's for
the same seed. Not int8 weights (torch's dynamic quantization): slower, and they change every sample and the
held-out likelihood.
"""
from __future__ import annotations

import copy
import functools
import warnings
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn as nn
import torch.nn.functional as F

# torch marks these fbgemm entry points deprecated but still ships them; they are the only float16-weight
# GEMM it has on x86 CPUs without native float16 (the quantized-op route adds per-call overhead).
_DEPRECATED = r"fbgemm_.* is deprecated"


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


class HalfWeightLinear(nn.Linear):
    """nn.Linear that, for CPU float32 inputs without autograd, multiplies by a packed float16 copy of its
    weight. The float32 weight stays the parameter (state_dict, save/load and training are unchanged); the
    packed copy is rebuilt when the weight changes (its version counter) and is never saved."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "HalfWeightLinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias  # the same parameters, not new ones
        new._packed, new._packed_key = None, None
        return new.train(linear.training)

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w._version, w.data_ptr())
        if self._packed_key != key:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", _DEPRECATED)
                self._packed = torch.fbgemm_pack_gemm_matrix_fp16(w.detach())
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.bias is None or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return torch.fbgemm_linear_fp16_weight_fp32_activation(x, self._packed_weight(), self.bias)

    def __getstate__(self):  # copies repack lazily: the packed matrix is an opaque handle
        return {**self.__dict__, "_packed": None, "_packed_key": None}


def weights_fit_float16(model: nn.Module) -> bool:
    """True when every nn.Linear weight and bias of model is exactly a float16 number (e.g. loaded from a float16
    file), so that half_weight_copy(model) loses nothing."""
    tensors = [t for m in model.modules() if type(m) is nn.Linear for t in (m.weight, m.bias) if t is not None]
    with torch.no_grad():
        return all(t.dtype == torch.float32 and torch.equal(t, t.half().float()) for t in tensors)


def half_weight_copy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of model (shared tokenizer) with every nn.Linear a HalfWeightLinear, packed and checked now.
    inplace: swap the layers of model itself (no second copy of its weights; they are shared anyway, but a
    deep copy duplicates them first); on failure model is left as it was."""
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("quantized_for_cpu needs a float32 model on the CPU: call it on model.float().cpu()")
    tokenizer = getattr(model, "tokenizer", None)
    new = model if inplace else copy.deepcopy(model, memo={id(tokenizer): tokenizer} if tokenizer is not None else None)
    swapped = []
    for module in list(new.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, HalfWeightLinear.from_linear(child))
                swapped.append((module, name, child))
    try:  # pack every weight now (fails early on CPUs or builds without fbgemm) and use each entry point once,
        with torch.inference_mode(), warnings.catch_warnings():  # which is when torch warns about them
            warnings.filterwarnings("ignore", _DEPRECATED)
            for m in new.modules():
                if isinstance(m, HalfWeightLinear):
                    m(torch.zeros(1, m.in_features))
    except (RuntimeError, AttributeError) as e:
        for module, name, child in swapped if inplace else ():
            setattr(module, name, child)
        raise ValueError(f"float16 CPU weights need torch's fbgemm kernels (x86 with AVX2), unavailable here "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); sample with the float32 model") \
            from None
    return new
