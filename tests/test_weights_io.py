"""Writing and loading weights without a second copy in memory: the streamed safetensors writer, models built
on the meta device and loaded by assignment, and the in-place float16-weight CPU path."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rqcore.pretrained import write_safetensors
from rqtransformer import RQTransformer, RQTransformerConfig
from rqtransformer.cpu import mkl_packing_available


def tiny_transformer(seed: int = 0) -> RQTransformer:
    torch.manual_seed(seed)
    return RQTransformer(RQTransformerConfig(codebook_size=32, code_shape=(2, 2, 2), dim=32, heads=2,
                                             spatial_layers=2, depth_layers=1, num_classes=3, dropout=0.0))


def test_streamed_safetensors_files_read_back_exactly(tmp_path):
    tensors = {"w": torch.randn(3, 5), "t": torch.randn(4, 3).t(), "flag": torch.tensor(True),
               "ids": torch.arange(7), "none": torch.zeros(0, 4), "h": torch.randn(6).bfloat16()}
    write_safetensors(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    back = load_file(str(tmp_path / "a.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    write_safetensors(tensors, tmp_path / "b.safetensors", dtype=torch.float16)  # floats cast as written
    back = load_file(str(tmp_path / "b.safetensors"))
    assert back["w"].dtype == torch.float16 and back["ids"].dtype == torch.int64 and back["flag"].dtype == torch.bool
    assert torch.equal(back["t"], tensors["t"].half())
    (tmp_path / "plain").touch()
    assert (tmp_path / "a.safetensors").stat().st_mode == (tmp_path / "plain").stat().st_mode
    assert not list(tmp_path.glob("*.tmp"))


def test_a_transformer_loads_by_assignment_without_a_random_init(tmp_path):
    model = tiny_transformer()
    model.save_pretrained(tmp_path / "m")
    loaded = RQTransformer.from_pretrained(tmp_path / "m")
    assert RQTransformer.meta_init and not any(t.is_meta for t in loaded.state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert all(p.requires_grad for p in loaded.parameters())  # still trainable
    codes = torch.randint(0, 32, (2, 2, 2, 2))
    assert torch.equal(model.eval()(codes), loaded(codes))


@pytest.mark.skipif(not mkl_packing_available(), reason="needs an x86 torch build")
def test_float16_weights_in_place_share_the_models_parameters():
    model = tiny_transformer().eval()
    params = [p.data_ptr() for p in model.parameters()]
    copy = model.quantized_for_cpu()
    same = model.quantized_for_cpu(inplace=True)
    assert same is model and [p.data_ptr() for p in same.parameters()] == params
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(copy.generate(num_samples=2, generator=g()), same.generate(num_samples=2, generator=g()))
