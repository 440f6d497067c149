"""Weight copies for faster CPU sampling: `quantized_copy(model, weights)` (`RQTransformer.quantized_for_cpu`)
swaps every nn.Linear for one that multiplies by a packed float16, int8 or int4 copy of its weight.

Why: a sampling step multiplies one token (or a few rows) by every weight matrix, so on a CPU it is bound by
reading the weights and by the kernel's per-call work, not by arithmetic. Fewer bytes per weight read less:
- float16: fbgemm's packed float16 weights, float32 activations and accumulation (x86 with AVX2). Weights
  stored as float16 (the bundled model's) are exact, so the copy samples the same codes as float32.
- int8: per-output-channel symmetric scales, torch's packed `_weight_int8pack_mm`, whose activations must be
  bfloat16 to be fast (8x slower with float32 ones): fast only where the CPU multiplies bf16 natively.
- int4: groups of INT4_GROUP input weights share a scale and offset, `_weight_int4pack_mm_for_cpu` (bf16).
Each copy keeps the float32 weight as the parameter (state_dict, saving and training are unchanged; autograd
and other devices use it) and rebuilds its packed copy when the weight changes (its version counter).
bench.precision gives the speed and fidelity (KL of the next-code distributions) of each.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from rqcore.machine import native_bf16

CPU_WEIGHTS = ("float32", "float16", "int8", "int4")  # what RQPipeline.from_pretrained(cpu_weights=) takes
INT4_GROUP = 32           # input weights per int4 scale and offset (smaller: closer to float32, more bytes)
LOW_BIT_MAX_ROWS = 16     # more rows per call: the int8 kernel is slower than float32's (docs/python.md)
INT8_MIN_DIM = 512        # "auto" picks int8 from this model width (narrower: the kernels' overhead dominates)
# torch marks these fbgemm entry points deprecated but still ships them; they are the only float16-weight
# GEMM it has on x86 CPUs without native float16 (the quantized-op route adds per-call overhead).
_DEPRECATED = r"fbgemm_.* is deprecated"


@contextmanager
def low_bit_every_row():
    """While active, int8 / int4 copies multiply any number of rows with their kernel (e.g. a teacher-forced
    forward computing at once what each sampling step computes: their kernels compute each row on its own)."""
    global LOW_BIT_MAX_ROWS
    saved, LOW_BIT_MAX_ROWS = LOW_BIT_MAX_ROWS, 1 << 62
    try:
        yield
    finally:
        LOW_BIT_MAX_ROWS = saved


class _PackedLinear(nn.Linear):
    """nn.Linear that, for CPU float32 inputs without autograd, multiplies by `_pack(weight)` in `_multiply`."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "_PackedLinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias  # the same parameters, not new ones
        new._packed, new._packed_key = None, None
        return new.train(linear.training)

    def _packed_weight(self):
        w = self.weight
        key = (w._version, w.data_ptr())
        if self._packed_key != key:
            with torch.no_grad():
                self._packed = self._pack(w.detach())
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled() or not self._fits(x):
            return F.linear(x, self.weight, self.bias)
        return self._multiply(x, self._packed_weight())

    def _fits(self, x: torch.Tensor) -> bool:
        return True

    def __getstate__(self):  # copies repack lazily: a packed matrix may be an opaque handle
        return {**self.__dict__, "_packed": None, "_packed_key": None}


class HalfWeightLinear(_PackedLinear):
    """float32 activations times fbgemm's packed float16 weight, float32 accumulation."""

    def _pack(self, w):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _DEPRECATED)
            return torch.fbgemm_pack_gemm_matrix_fp16(w)

    def _fits(self, x):
        return self.bias is not None

    def _multiply(self, x, packed):  # torch warns on an entry point's first use: quantized_copy's check call
        return torch.fbgemm_linear_fp16_weight_fp32_activation(x, packed, self.bias)


class _LowBitLinear(_PackedLinear):
    """bf16 activations times a packed low-bit weight for up to LOW_BIT_MAX_ROWS rows; float32 beyond."""

    def _fits(self, x):
        return x.numel() <= LOW_BIT_MAX_ROWS * self.in_features

    def _multiply(self, x, packed):
        y = self._kernel(x.reshape(-1, self.in_features).to(torch.bfloat16), packed).float()  # [rows, out]
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)


class Int8WeightLinear(_LowBitLinear):
    """int8 weights with one scale per output channel: w ~= q * scale, q in [-127, 127]."""

    def _pack(self, w):  # w [out, in] -> (q int8 [out, in], scale bf16 [out])
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # rounded first: q is made for it
        q = (w / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return q, scale

    def _kernel(self, x, packed):
        return torch.ops.aten._weight_int8pack_mm(x, *packed)


class Int4WeightLinear(_LowBitLinear):
    """int4 weights in groups of INT4_GROUP inputs: w ~= (q - 8) * scale + offset, q in [0, 15]."""

    def _pack(self, w):  # w [out, in] -> (packed int4, [in / group, out, 2] bf16 scales and offsets)
        out, n = w.shape
        groups = w.reshape(out, n // INT4_GROUP, INT4_GROUP)  # [out, groups, group]
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
        offset = (low + 8 * scale).to(torch.bfloat16).float()  # the value of q = 8
        q = ((groups - offset[..., None]) / scale[..., None] + 8).round_().clamp_(0, 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(out, n), 1)
        return packed, torch.stack([scale, offset], -1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def _kernel(self, x, packed):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed[0], INT4_GROUP, packed[1])


LAYERS = {"float16": HalfWeightLinear, "int8": Int8WeightLinear, "int4": Int4WeightLinear}
NEEDS = {"float16": "torch's fbgemm kernels (x86 with AVX2)",
         "int8": "torch's packed int8 matmul (_weight_int8pack_mm)",
         "int4": "torch's packed int4 matmul (_weight_int4pack_mm_for_cpu)"}


def check_cpu_weights(weights: str, allow_auto: bool = True) -> str:
    names = ("auto", *CPU_WEIGHTS) if allow_auto else CPU_WEIGHTS
    if weights not in names:
        raise ValueError(f"cpu_weights must be one of {', '.join(map(repr, names))}, got {weights!r}")
    return weights


def default_cpu_weights(model: nn.Module) -> str:
    """cpu_weights="auto": int8 on CPUs that multiply bf16 natively, for models at least INT8_MIN_DIM wide;
    else float16. Each meets the fidelity bound (mean KL <= 0.01 nats per code, bench.precision)."""
    wide = getattr(getattr(model, "config", None), "dim", 0) >= INT8_MIN_DIM
    return "int8" if wide and native_bf16() else "float16"


def _swappable(linear: nn.Linear, weights: str) -> bool:
    if weights == "int4":  # the kernel needs whole groups and output channels in multiples of 16
        return linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0
    return True


def quantized_copy(model: nn.Module, weights: str = "float16", inplace: bool = False) -> nn.Module:
    """A copy of model (shared tokenizer) with every nn.Linear multiplying by `weights` ("float16", "int8" or
    "int4"), packed and checked now. inplace: swap the layers of model itself (no second copy of its weights);
    on failure model is left as it was. ValueError where this CPU or torch build lacks the kernels."""
    check_cpu_weights(weights, allow_auto=False)
    if weights == "float32":
        return model if inplace else copy.deepcopy(model)
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("quantized_for_cpu needs a float32 model on the CPU: call it on model.float().cpu()")
    tokenizer = getattr(model, "tokenizer", None)
    new = model if inplace else copy.deepcopy(model, memo={id(tokenizer): tokenizer} if tokenizer is not None else None)
    swapped = []
    for module in list(new.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear and _swappable(child, weights):
                setattr(module, name, LAYERS[weights].from_linear(child))
                swapped.append((module, name, child))
    try:  # pack every weight now and run each kernel once: fails early on CPUs or builds without it, and is when
        with torch.inference_mode(), warnings.catch_warnings():  # torch warns about fbgemm's deprecated entry points
            warnings.filterwarnings("ignore", _DEPRECATED)
            for m in new.modules():
                if isinstance(m, _PackedLinear):
                    m(torch.zeros(1, m.in_features))
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        for module, name, child in swapped if inplace else ():
            setattr(module, name, child)
        raise ValueError(f"{weights} CPU weights need {NEEDS[weights]}, unavailable here "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); sample with the float32 model") \
            from None
    return new
