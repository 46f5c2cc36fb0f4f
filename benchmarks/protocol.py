"""The fixed measurement protocol shared by the overhead script and the pytest-benchmark suite.

A MobileNetV3-small backbone (timm, random weights) with a small conv head, about 2 M parameters;
batch 16 at 128×128; SGD with momentum; 2 threads; CPU (another device where :func:`build_all` is
given one: the models and the batch are put there). Each variant has its own model, optimizer and
regularizer (identical initial weights), consolidated once on a few samples so its penalty is active.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import clreg

BATCH, SIZE, CLASSES, THREADS = 16, 128, 10, 2


class Net(nn.Module):
    """MobileNetV3-small features + a conv head (conv-BN-ReLU, 1×1 classifier), ~2 M parameters."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        backbone = timm.create_model("mobilenetv3_small_100", pretrained=False)
        backbone.reset_classifier(0)
        backbone.conv_head = nn.Identity()  # the features alone: forward_features gives (B, 576, h, w)
        self.backbone = backbone
        c = backbone.num_features
        self.head = nn.Sequential(
            nn.Conv2d(c, 192, 3, padding=1, bias=False), nn.BatchNorm2d(192), nn.ReLU(), nn.Conv2d(192, CLASSES, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x)).mean(dim=(2, 3))


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


@dataclass
class Variant:
    name: str
    step: Callable[[], None]
    reg: nn.Module | None
    model: nn.Module
    held: Callable[[], int] = lambda: 0  # bytes of state the method keeps


def _consolidate(
    reg: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, tasks: int
) -> None:
    data = TensorDataset(x[:4], y[:4])
    for _ in range(tasks):
        if isinstance(reg, (clreg.SI, clreg.RWalk)):
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        reg.consolidate(model, data, clreg.TaskSpec())


def make_variant(name: str, state: dict, x: torch.Tensor, y: torch.Tensor) -> Variant:
    """``name`` is ``plain`` or ``<reg>-<mode>`` with reg in ewc, ewc5, online_ewc, mas, si, rwalk (its
    Fisher updated every 10 steps), l2sp, lwf, kfac_ewc (Kronecker factors of at most 1024 rows, the diagonal elsewhere) or kfac_ewc_full (every
    linear and ungrouped convolution factored) and mode autograd, attached or attached+value (the
    value computed for logging each step)."""
    model = Net()
    model.load_state_dict(state)
    model.to(x.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    reg = None
    mode = "autograd"
    if name != "plain":
        kind, mode = name.split("-", 1)
        reg = {
            "ewc": lambda: clreg.EWC(model, lam=1.0, max_samples=4),
            "ewc5": lambda: clreg.EWC(model, lam=1.0, max_samples=4),
            "online_ewc": lambda: clreg.OnlineEWC(model, lam=1.0, gamma=0.9, max_samples=4),
            "mas": lambda: clreg.MAS(model, lam=1.0, max_samples=4),
            "si": lambda: clreg.SI(model, c=0.1),
            "lwf": lambda: clreg.LwF(model, temperature=2.0),
            "kfac_ewc": lambda: clreg.KFACEWC(model, lam=1.0, max_samples=4),  # factors of at most 1024 rows
            "kfac_ewc_full": lambda: clreg.KFACEWC(model, lam=1.0, max_samples=4, max_factor=1 << 20),
            "rwalk": lambda: clreg.RWalk(model, lam=1.0, update_every=10),
            "l2sp": lambda: clreg.L2SP(model, alpha=1.0),
        }[kind]()
        if isinstance(reg, (clreg.SI, clreg.RWalk)):
            reg.attach(opt) if mode.startswith("attached") else reg.track(opt)
        _consolidate(reg, model, opt, x, y, 5 if kind == "ewc5" else 1)
        if mode.startswith("attached") and not isinstance(reg, (clreg.SI, clreg.RWalk)):
            reg.attach(opt)
    with_value = mode == "attached+value"
    attached = mode.startswith("attached")

    def step() -> None:
        out = model(x)
        loss = F.cross_entropy(out, y)
        if reg is not None:
            if not attached:
                loss = loss + reg(model, inputs=x, outputs=out)
            elif with_value:
                reg(model)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return Variant(name, step, reg, model, reg.state_bytes if reg is not None else lambda: 0)


def make_family_variant(name: str, state: dict, x: torch.Tensor, y: torch.Tensor) -> Variant:
    """The methods that replay or distil, each after one earlier task (a second batch stored or
    consolidated): ``agem-attached`` (a reference of 16 samples every step), ``der-autograd`` (one
    draw of 16), ``derpp-autograd`` (two draws of 16), ``er_ace-autograd`` (one draw of 16, the incoming
    loss masked), ``feature_distillation-autograd`` (POD on the backbone's features, read from the
    loop's forward; one teacher forward), and their floors: ``floor-2x`` and ``floor-3x``, the plain
    step with one or two more forward and backward passes of 16 samples (what replaying a draw costs
    at the least)."""
    model = Net()
    model.load_state_dict(state)
    model.to(x.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x2, y2 = (t.to(x.device) for t in make_batch(seed=1))
    reg, extra_passes, watch = None, 0, False
    if name.startswith("floor-"):
        extra_passes = int(name.removeprefix("floor-").removesuffix("x")) - 1
    elif name == "agem-attached":
        reg = clreg.AGEM(model, lambda m, a, b: F.cross_entropy(m(a), b), capacity_per_task=BATCH, sample_size=BATCH)
        reg.consolidate(model, TensorDataset(x2, y2))
        reg.attach(opt)
    elif name == "er_ace-autograd":
        reg = clreg.ERACE(model, capacity=BATCH, batch_size=BATCH)
        reg.observe(x2, y2)
    elif name in ("der-autograd", "derpp-autograd"):
        reg = clreg.DER(model, BATCH, alpha=0.3, beta=0.5 if name == "derpp-autograd" else 0.0, batch_size=BATCH)
        with torch.no_grad():
            reg.observe(x2, y2, model(x2))
    elif name == "feature_distillation-autograd":
        reg, watch = clreg.FeatureDistillation(model, modules=["backbone.blocks"], kind="pod", alpha=1.0), True
        reg.consolidate(model)
    else:
        raise ValueError(f"unknown variant {name!r}")

    def loss() -> torch.Tensor:
        with reg.watch(model) if watch else contextlib.nullcontext():
            out = model(x)
        if isinstance(reg, clreg.ERACE):
            return reg.incoming_loss(out, y) + reg(model, inputs=x, outputs=out)
        total = F.cross_entropy(out, y)
        for _ in range(extra_passes):
            total = total + F.cross_entropy(model(x2), y2)
        return total if reg is None or reg.attachable else total + reg(model, inputs=x, outputs=out)

    def step() -> None:
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()

    return Variant(name, step, reg, model, reg.state_bytes if reg is not None else lambda: 0)


def avalanche_available() -> bool:
    try:
        import avalanche.training.plugins  # noqa: F401
    except ImportError:
        return False
    return True


def make_avalanche_variant(name: str, state: dict, x: torch.Tensor, y: torch.Tensor) -> Variant:
    """Avalanche's ``EWCPlugin``, ``SynapticIntelligencePlugin``, ``AGEMPlugin`` or ``RWalkPlugin``
    (``avalanche-ewc`` / ``-si`` / ``-agem`` / ``-rwalk``, avalanche-lib 0.6) on the same step: the
    plugin's own hooks are called where Avalanche's training loop calls them, on a minimal stand-in for
    its strategy object, so the timing holds the plugins' work and not the rest of Avalanche's loop.
    A-GEM's memory draw is pinned to a second batch of 16 (its data loader is not timed), as clreg's
    ``agem-attached`` draws 16; RWalk updates its scores every 10 steps, as clreg's ``rwalk-*``."""
    from types import SimpleNamespace

    from avalanche.training.plugins import AGEMPlugin, EWCPlugin, RWalkPlugin, SynapticIntelligencePlugin

    model = Net()
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    data = TensorDataset(x[:4], y[:4], torch.zeros(4, dtype=torch.long))  # (input, target, task label)
    strategy = SimpleNamespace(
        model=model, optimizer=opt, device=torch.device("cpu"), _criterion=nn.CrossEntropyLoss(),
        clock=SimpleNamespace(train_exp_counter=0, train_iterations=0), experience=SimpleNamespace(dataset=data),
        train_mb_size=4, loss=None, mbatch=(x, y, torch.zeros(len(y), dtype=torch.long)),
    )  # fmt: skip
    plugin = {
        "avalanche-ewc": lambda: EWCPlugin(ewc_lambda=1.0),
        "avalanche-si": lambda: SynapticIntelligencePlugin(si_lambda=0.1),
        "avalanche-agem": lambda: AGEMPlugin(patterns_per_experience=BATCH, sample_size=BATCH),
        "avalanche-rwalk": lambda: RWalkPlugin(ewc_lambda=1.0, delta_t=10),
    }[name]()
    if name == "avalanche-agem":
        x2, y2 = make_batch(seed=1)
        plugin.sample_from_memory = lambda: (x2, y2, torch.zeros(len(y2), dtype=torch.long))

    def step() -> None:
        plugin.before_training_iteration(strategy)
        strategy.loss = F.cross_entropy(model(x), y)
        plugin.before_backward(strategy)
        opt.zero_grad()
        strategy.loss.backward()
        plugin.after_backward(strategy)
        opt.step()
        plugin.after_training_iteration(strategy)
        strategy.clock.train_iterations += 1

    plugin.before_training(strategy)
    plugin.before_training_exp(strategy)  # the first experience: a few steps, then its consolidation
    for _ in range(2):
        step()
    if name == "avalanche-agem":
        plugin.buffers = [data]  # stored (the draw itself is pinned above)
    else:
        plugin.after_training_exp(strategy)
    strategy.clock.train_exp_counter = 1
    plugin.before_training_exp(strategy)

    def held() -> int:  # every tensor the plugin keeps (its dicts of ParamData)
        seen, stack, total = set(), [vars(plugin)], 0
        while stack:
            obj = stack.pop()
            if isinstance(obj, torch.Tensor):
                if id(obj) not in seen:
                    seen.add(id(obj))
                    total += obj.numel() * obj.element_size()
            elif isinstance(obj, dict):
                stack.extend(obj.values())
            elif isinstance(obj, (list, tuple)):
                stack.extend(obj)
            elif hasattr(obj, "data") and isinstance(obj.data, torch.Tensor):  # ParamData
                stack.append(obj.data)
        return total

    return Variant(name, step, None, model, held)


VARIANTS = [
    "plain",
    "ewc-autograd",
    "ewc-attached",
    "ewc-attached+value",
    "ewc5-attached",
    "online_ewc-autograd",
    "online_ewc-attached",
    "mas-autograd",
    "mas-attached",
    "si-autograd",
    "si-attached",
    "lwf-autograd",
    "kfac_ewc-autograd",
    "kfac_ewc-attached",
    "kfac_ewc_full-attached",
    "rwalk-autograd",
    "rwalk-attached",
    "l2sp-autograd",
    "l2sp-attached",
]
FAMILY_VARIANTS = [  # after the core's: the rest of the family and their floors
    "floor-2x",
    "floor-3x",
    "agem-attached",
    "der-autograd",
    "derpp-autograd",
    "er_ace-autograd",
    "feature_distillation-autograd",
]
VARIANTS += FAMILY_VARIANTS


AVALANCHE_VARIANTS = [
    "avalanche-ewc",
    "avalanche-si",
    "avalanche-agem",
    "avalanche-rwalk",
]  # run when avalanche-lib is installed


def build_all(names: list[str] | None = None, device: str | torch.device = "cpu") -> list[Variant]:
    """The variants named (default: :data:`VARIANTS`, plus Avalanche's when it is installed), their
    models and batch on ``device`` (Avalanche's variants on the CPU only)."""
    if names is None:
        names = VARIANTS + (AVALANCHE_VARIANTS if avalanche_available() else [])
    if torch.device(device).type != "cpu" and any(n.startswith("avalanche-") for n in names):
        raise ValueError("Avalanche's variants run on the CPU only")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    state = Net().state_dict()
    x, y = (t.to(device) for t in make_batch())
    return [_maker(n)(n, state, x, y) for n in names]


def _maker(name: str) -> Callable[[str, dict, torch.Tensor, torch.Tensor], Variant]:
    if name.startswith("avalanche-"):
        return make_avalanche_variant
    return make_family_variant if name in FAMILY_VARIANTS else make_variant


def synchronize() -> None:
    """Wait for the GPU's queued work, where CUDA is in use (a no-op on the CPU)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], None]) -> float:
    synchronize()
    t = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t
