"""Device hygiene (DESIGN.md, "Devices and generators"), emulated on the CPU: every installed family's
`loss` and `sample`, and `neon diagnose`'s gradient path, run with the network and batch on another
device than the CPU generators they are handed, and no random draw may land on another device than
its generator's, nor may a generator be made on the model's device (CUDA refuses the first; the
second makes a seed's draws differ between the CPU and CUDA).

The other device is "meta" as tensors report it, with real data underneath: `Elsewhere` wraps a CPU
tensor and reports the meta device; `_Emulated` (a TorchDispatchMode) runs every op on the wrapped
CPU data and wraps what comes out of an op on the other device; `_Draws` (a TorchFunctionMode)
records each draw whose output is on another device than its `generator`, and `_Generator` one made
on the other device. Values, `.item()` and `.tolist()` work as on the CPU, so code that reads numbers
(schedules, padding sizes) runs unchanged; CPU autocast stands in for the other device's.
"""

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from neon import diagnose
from neon import family as registry

OTHER = torch.device("meta")  # stands in for CUDA
_real_generator = torch.Generator


class Elsewhere(torch.Tensor):
    """A CPU tensor (`inner`) that reports the device OTHER."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            dtype=inner.dtype,
            device=OTHER,
            storage_offset=inner.storage_offset(),
            requires_grad=inner.requires_grad,
        )

    def __init__(self, inner):
        self.inner = inner

    def __repr__(self):
        return f"Elsewhere({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return NotImplemented  # _Emulated handles every op


def _is_other(device) -> bool:
    return device is not None and torch.device(device).type == OTHER.type


def _on_cpu(x):
    return torch.device("cpu") if isinstance(x, torch.device) else x


class _Emulated(TorchDispatchMode):
    """Runs ops on OTHER as CPU ops on wrapped data."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wrappers = {}
        other = False

        def unwrap(x):
            nonlocal other
            if isinstance(x, Elsewhere):
                other = True
                wrappers[id(x.inner)] = x
                return x.inner
            return x

        args, kwargs = tree_map(unwrap, (args, kwargs))
        targets = [x for x in (*args, kwargs.get("device")) if isinstance(x, torch.device)]
        if targets:  # a factory or a move: its target decides
            other = _is_other(targets[0])
            args, kwargs = tuple(map(_on_cpu, args)), {k: _on_cpu(v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)

        def wrap(x):
            if not isinstance(x, torch.Tensor) or not other:
                return x
            wrapped = wrappers.get(id(x))  # in-place ops return their input
            if wrapped is not None:
                return wrapped
            # autograd sets a view's version counter, which an inference tensor has not
            with torch.inference_mode(False):
                return Elsewhere(x)

        return tree_map(wrap, out)


class _Draws(TorchFunctionMode):
    """Records in `violations` each call with a `generator=` whose output lands on another device than
    the generator's: the `device` asked for, else the first tensor argument's (`normal_`,
    `multinomial`, ...), else the CPU. Checked here, above the dispatcher, where the generator is still
    the object the code made (`_Generator`). Also: `torch.tensor(data, device=OTHER)` and its kin copy
    the data to the device below the dispatch mode, where the emulation cannot see it: made on the CPU
    here, then moved."""

    FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}

    def __init__(self):
        super().__init__()
        self.violations = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        g = kwargs.get("generator")
        if isinstance(g, _real_generator):
            tensors = [x for x in args if isinstance(x, torch.Tensor)]
            target = kwargs.get("device") or (tensors[0].device if tensors else "cpu")
            where = g.device
            if _is_other(target) != _is_other(where):
                name = getattr(func, "__name__", func)
                self.violations.append(f"{name}: generator on {where}, draw on {target}")
        if func in self.FROM_DATA and _is_other(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": "cpu"}).to(OTHER)
        return func(*args, **kwargs)


class _Generator(_real_generator):
    """torch.Generator for code under test: one made on OTHER is a CPU generator that the emulation
    takes to be on OTHER (`elsewhere`), counted in `made_elsewhere`."""

    def __new__(cls, device="cpu"):
        return _real_generator.__new__(cls, "cpu" if _is_other(device) else device)

    def __init__(self, device="cpu"):
        self.elsewhere = _is_other(device)
        if self.elsewhere:
            made_elsewhere.append(self)

    @property
    def device(self):
        return OTHER if self.elsewhere else super().device


made_elsewhere: list[torch.Generator] = []


class _Autocast(torch.autocast):
    """torch.autocast, with the CPU's autocast standing in for OTHER's (meta has none)."""

    def __init__(self, device_type, *args, **kwargs):
        super().__init__("cpu" if device_type == OTHER.type else device_type, *args, **kwargs)


def _on_cpu_autocast(query):
    """An autocast query (is_autocast_enabled, get_autocast_dtype) answering the CPU's for OTHER."""

    def asked(*args):
        return query(*("cpu" if a == OTHER.type else a for a in args))

    return asked


_tolist = torch.Tensor.tolist


def _tolist_elsewhere(self):
    return _tolist(self.inner if isinstance(self, Elsewhere) else self)  # refused for subclasses


@contextlib.contextmanager
def emulated():
    """Within: the emulated device and the check of draws (`_Draws`, yielded: its `violations`),
    generators made on OTHER counted in `made_elsewhere`."""
    made_elsewhere.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "Generator", _Generator)
        patch.setattr(torch, "autocast", _Autocast)
        for query in ("is_autocast_enabled", "get_autocast_dtype"):
            patch.setattr(torch, query, _on_cpu_autocast(getattr(torch, query)))
        patch.setattr(torch.Tensor, "tolist", _tolist_elsewhere)
        with _Draws() as mode, _Emulated():
            yield mode


def _elsewhere(model):
    """The model with its net and codec moved to OTHER (emulated)."""
    for module in (model.net, model.codec):
        if module is not None:
            module.to(OTHER)
    return model


def _labels(model, n):
    return torch.arange(n) % model.num_classes if model.num_classes else torch.full((n,), -1)


# Families whose `sample` keeps its per-sample generators on the model's device, as their docstrings
# say (a seed's draws then differ by device): tests/gpu compares only what holds for them.
DRAWS_ON_DEVICE = {"var": "top-k/top-p token draws from the logits on the device (VAR/family.py)"}


def _flagged(mode, allow_device_generators=False):
    made = [] if allow_device_generators else [f"torch.Generator(device={OTHER})"] * len(made_elsewhere)
    return mode.violations + made


@pytest.fixture(params=registry.names())
def fam(request, one_thread):
    return registry.get(request.param)


def test_emulation_flags_a_cpu_generator_drawing_elsewhere_and_not_a_moved_draw():
    g = torch.Generator().manual_seed(0)
    with emulated() as mode:
        x = torch.ones(3, device=OTHER)
        moved = torch.randn(3, generator=g).to(OTHER)
        assert moved.device == OTHER and (x + moved).device == OTHER and not _flagged(mode)
        torch.randn(3, device=OTHER, generator=g)
        torch.empty(3, device=OTHER).normal_(generator=g)
        torch.Generator(device=OTHER)
    assert len(_flagged(mode)) == 3
    reference = torch.randn(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(moved.inner, reference)  # the emulated device computes real values


def test_loss_and_sample_draw_on_their_generators_device(fam):
    model = fam.tiny(0)
    n = 4
    samples = fam.sample(model, _labels(model, n), torch.arange(n), fam.Sampler())
    model.net.train().requires_grad_(True)
    with emulated() as mode:
        _elsewhere(model)
        generator = torch.Generator().manual_seed(0)
        loss = fam.loss(model, samples.to(OTHER), _labels(model, n).to(OTHER), generator)
        loss.backward()
        model.net.eval().requires_grad_(False)
        out = fam.sample(model, _labels(model, n), torch.arange(n), fam.Sampler())
    assert loss.device == OTHER and out.shape == samples.shape
    flagged = _flagged(mode, allow_device_generators=fam.name in DRAWS_ON_DEVICE)
    assert not flagged, f"{fam.name}: {len(flagged)} off their generator's device:\n" + "\n".join(flagged)
    assert bool(made_elsewhere) == (fam.name in DRAWS_ON_DEVICE)  # the table says which families draw there


def test_diagnose_gradients_draw_on_their_generators_device(fam):
    model = fam.tiny(0)
    n = 8  # two batches of 4: IMM's loss takes groups of 4
    samples, labels = fam.sample(model, _labels(model, n), torch.arange(n), fam.Sampler()), _labels(model, n)
    with emulated() as mode:
        _elsewhere(model)
        grads = diagnose.batch_gradients(fam, model, samples, labels, batches=2, repeats=1, seed=0)
    assert grads.shape[0] == 2 and grads.device.type == "cpu"
    flagged = _flagged(mode)
    assert not flagged, f"{fam.name}: {len(flagged)} off their generator's device:\n" + "\n".join(flagged)
