"""PEFT adapters: EWC, Online EWC, SI and MAS hold state for the adapter's parameters alone; the state
round-trips with the adapter weights through save_with_adapter / PeftModel.from_pretrained /
load_with_adapter; LwF's teacher from the adapter alone equals the full copy's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

peft = pytest.importorskip("peft")

import clreg  # noqa: E402
from clreg.integrations.peft import adapter_params, load_with_adapter, save_with_adapter  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def lora(modules_to_save=None) -> torch.nn.Module:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["body", "head"], modules_to_save=modules_to_save)
    return peft.get_peft_model(Net(), config)


def data(seed: int = 0, n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def train(model, regs, steps: int = 5) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    for r in regs:
        if isinstance(r, clreg.SI):
            r.attach(opt)
    x, y = data().tensors
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for r in regs:
        r.detach()


def build(model) -> list[clreg.Regularizer]:
    sel = adapter_params(model)
    return [clreg.EWC(model, lam=2.0, params=sel), clreg.OnlineEWC(model, lam=2.0, gamma=0.9, params=sel),
            clreg.SI(model, c=0.5, params=sel), clreg.MAS(model, lam=2.0, params=sel)]  # fmt: skip


def lora_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if "lora_" in n]


def test_only_the_adapter_carries_state() -> None:
    model = lora()
    regs = build(model)
    assert len(lora_names(model)) == 4  # lora_A and lora_B of two layers
    train(model, regs)
    for r in regs:
        r.consolidate(model, data())
        assert r.param_names == lora_names(model), type(r).__name__
        shaped = [t for k, t in r.state_dict().items() if isinstance(t, torch.Tensor) and t.dim() > 0]
        assert sum(t.numel() for t in shaped) > 0
        lora_sizes = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert r.state_bytes() <= 8 * lora_sizes * 8  # a few adapter-sized tensors, no base-sized one
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" not in n:
                p.add_(1.0)  # the base weights move: no penalty sees them
    assert all(float(r(model)) == 0.0 for r in regs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1)
    assert all(float(r(model)) > 0.0 for r in regs)


def test_the_state_round_trips_with_the_adapter(tmp_path) -> None:
    model = lora()
    reg = clreg.Compose(*build(model))
    train(model, reg.members)
    reg.consolidate(model, data())
    train(model, reg.members, steps=3)  # SI's path into task 2 is state too
    save_with_adapter(model, reg, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "clreg.pt").is_file()

    loaded = peft.PeftModel.from_pretrained(Net(), str(tmp_path), is_trainable=True)
    again = clreg.Compose(*build(loaded))
    load_with_adapter(again, tmp_path)
    for (k, a), (k2, b) in zip(reg.state_dict().items(), again.state_dict().items()):
        assert k == k2
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=k)
    for a, b in zip(lora_names(model), lora_names(loaded)):
        torch.testing.assert_close(dict(loaded.named_parameters())[b], dict(model.named_parameters())[a])
    with torch.no_grad():
        for m in (model, loaded):
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.mul_(1.5)
    for r, s in zip(reg.members, again.members):
        torch.testing.assert_close(s(loaded), r(model), rtol=1e-6, atol=1e-8)
    with pytest.raises(FileNotFoundError, match="save_with_adapter"):
        load_with_adapter(again, tmp_path / "nowhere")


def test_lwf_with_the_adapter_alone_as_teacher_equals_the_full_copy() -> None:
    model = lora()
    full = clreg.LwF(model, temperature=2.0)
    slim = clreg.LwF(model, temperature=2.0, params=adapter_params(model), teacher_params="selected")
    assert len(slim.teacher_params.tensors) == 4 < len(full.teacher_params.tensors)
    train(model, [])
    full.consolidate(model)
    slim.consolidate(model)
    train(model, [], steps=3)
    x = data(1).tensors[0]
    out = model(x)
    a, b = full(model, inputs=x, outputs=out), slim(model, inputs=x, outputs=out)
    assert float(a) > 1e-4
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    ga = torch.autograd.grad(a, [p for p in model.parameters() if p.requires_grad], retain_graph=True)
    gb = torch.autograd.grad(b, [p for p in model.parameters() if p.requires_grad])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, rtol=1e-6, atol=1e-9)


def test_the_predicate_names_adapters_and_full_modules_and_refuses_others() -> None:
    model = lora(modules_to_save=["head"])
    plain = clreg.EWC(model, params=adapter_params(model)).param_names
    with_head = clreg.EWC(model, params=adapter_params(model, modules_to_save=True)).param_names
    assert all("lora_" in n for n in plain)
    extra = sorted(set(with_head) - set(plain))
    assert extra and all("modules_to_save.default" in n for n in extra)
    assert clreg.EWC(model, params=adapter_params(model, "default")).param_names == plain
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        adapter_params(model, "other")
    with pytest.raises(TypeError, match="PEFT model"):
        adapter_params(Net())
    frozen_head = lora()
    frozen_head.base_model.model.head.base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="outside the selection train"):
        clreg.LwF(frozen_head, params=adapter_params(frozen_head), teacher_params="selected")
