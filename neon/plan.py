"""What a recipe costs before it runs (`neon plan`): per-GPU memory, disk, images, FLOPs and GPU-hours.

Nothing is allocated and no checkpoint is read. The family builds the recipe's full-size model on the
meta device (its optional `full_size`); the fine-tune step (the family's `loss` at the per-GPU batch
and precision, backward, AdamW, the EMA copy) and the family's sampler (at 4 and 8 images, linear in
the batch from there; samplers autocast on CUDA only, so these run in float32: an upper bound) run on
fake CPU tensors (`torch._subclasses.fake_tensor.FakeTensorMode`; fake CUDA tensors fail in the
autograd engine, and autocast does the same casts on both), under `_Tracker`: a dispatch
mode that adds up the bytes of the live tensor storages (the peak: what a caching allocator needs at
least) and counts FLOPs by `torch.utils.flop_counter`'s formulas (tests/core/test_plan.py: real too).

Images: S, the fine-tune's images, the selection's upper bound for the recipe's search strategy
(`selection_bound`) and the final report's. GPU-hours: the FLOPs of each step at `--gpu-tflops`
(16-bit tensor-core peak; fp32 phases at half of it, as TF32) × `--utilization`.
"""

import copy
import dataclasses
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

from neon import family as neon_family
from neon import finetune, search
from neon.errors import NeonError

GIB = 2**30
H100 = {"gpus": 8, "gpu_memory": 80.0, "gpu_tflops": 989.0, "utilization": 0.4}
"""Defaults: 8 H100 SXM of 80 GiB, 989 dense fp16/bf16 TFLOP/s, 40% of it reached (model FLOPs)."""


_ASSUMED = {torch.ops.aten.any: False, torch.ops.aten.all: True}
_SCALAR = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)


class _Tracker(TorchDispatchMode):
    """Live storage bytes (and their peak) and FLOPs of everything dispatched under it; FLOPs inside
    a call of a module `count_calls` hooks are also recorded per call, with the call's batch. On fake
    tensors, the data-dependent checks families make of their inputs (`if (labels < 0).any(): raise`,
    `isfinite(x).all()`) read as passed (`any` False, `all` True), any other scalar read from a
    tensor as 0 (EDM's augmentation pads its images by none: a slight underestimate), and `nonzero`
    (a boolean mask's indices, `x[mask]`) as every entry (an upper bound)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.flops = 0, 0, 0.0
        self._sizes = WeakIdKeyDictionary()
        self._assumed = WeakIdKeyDictionary()
        self.calls: list[list] = []  # [flops, batch] of each hooked call
        self._depth = 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._sizes:
            return
        self._sizes[storage] = size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def count_calls(self, module: torch.nn.Module) -> list:
        def before(_, args):
            first = next((a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)), None)
            self.calls.append([self.flops, first.shape[0] if first is not None and first.ndim else 1])
            self._depth += 1

        def after(*_):
            self._depth -= 1
            if self._depth == 0:
                self.calls[-1][0] = self.flops - self.calls[-1][0]
        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SCALAR and isinstance(args[0], FakeTensor):
            return self._assumed.get(args[0], args[0].dtype.is_floating_point and 0.0 or 0)
        if func is torch.ops.aten.nonzero.default and isinstance(args[0], FakeTensor):
            out = torch.zeros(args[0].numel(), args[0].dim(), dtype=torch.int64, device=args[0].device)
        else:
            if func is torch.ops.aten.index.Tensor and isinstance(args[0], FakeTensor):
                args = (args[0], [j for i in args[1] for j in _mask_indices(i)], *args[2:])
            if func._overloadpacket not in flop_registry and func.namespace == "aten":
                with self:  # inference mode keeps linear, conv2d, …: count their parts (as FlopCounterMode)
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            out = func(*args, **kwargs)
        if func._overloadpacket in _ASSUMED and isinstance(out, FakeTensor):
            self._assumed[out] = _ASSUMED[func._overloadpacket]
        if func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def _mask_indices(index) -> list:
    """A boolean mask index as the integer indices of all its entries (`_Tracker`); others as they are."""
    if index is None or index.dtype != torch.bool:
        return [index]
    return [torch.zeros(index.numel(), dtype=torch.int64, device=index.device)] * index.dim()


@dataclasses.dataclass(frozen=True)
class Step:
    """One measured step: its peak live bytes, FLOPs per image and the static bytes (weights,
    gradients, optimizer and EMA state) within the peak."""

    peak: int
    flops: float
    static: int = 0
    how: str = "measured"
    """How a sampling batch was measured: 'sampler' (the family's own) or 'forward' (a stand-in)."""


def _bytes(module: torch.nn.Module | None) -> int:
    tensors = [] if module is None else [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _batch(fam, model, batch: int):
    """(samples, labels) of `batch` zeros in the family's sample format, on the CPU."""
    if model.image_size:
        samples = torch.zeros(batch, 3, model.image_size, model.image_size, dtype=torch.uint8)
    else:  # a family whose samples are not images: their shape from one sample of its tiny model
        one = fam.sample(fam.tiny(0), torch.full((1,), -1), torch.zeros(1, dtype=torch.int64), fam.Sampler())
        samples = torch.zeros(batch, *one.shape[1:], dtype=one.dtype)
    labels = torch.arange(batch) % model.num_classes if model.num_classes else torch.full((batch,), -1)
    return samples, labels


def measure_finetune(fam, model, batch: int, precision: str, ema: bool, device,
                     real_optimizer: bool = False) -> Step:
    """One fine-tune step of `model` (its tensors on `device`: fake or real) at `batch` images: the
    family's CPU-side `prepare` (on real tensors, as the input pipeline runs it), `loss` under the
    precision's autocast, backward and an AdamW step (`_adam_step`, or torch's on real tensors with
    `real_optimizer`), with an EMA copy of the network alive."""
    net = model.net.train().requires_grad_(True)
    tracker, generator = _Tracker(), torch.Generator().manual_seed(0)
    with unset_fake_temporarily():  # the CPU side runs on real tensors, as the input pipeline runs it
        samples, labels = _batch(fam, model, batch)
        prepare = neon_family.member(fam, "prepare")
        if prepare is not None:
            samples = prepare(samples, generator)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with tracker:
        _hold(tracker, model)
        copies = [p.detach().clone() for p in net.parameters()] if ema else []
        params = list(net.parameters())
        opt = torch.optim.AdamW(params, lr=1e-6) if real_optimizer else None
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = fam.loss(model, samples.to(device), labels.to(device), generator)
        loss.backward()
        if opt is not None:
            opt.step()
        else:
            _adam_step(params)
        for p in params:
            p.grad = None
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    static = _bytes(net) + _bytes(model.codec) + params * (3 + bool(copies))  # + grads, 2 moments, EMA
    return Step(tracker.peak, tracker.flops / batch, static)


@torch.no_grad()
def _adam_step(params: list[torch.Tensor]) -> None:
    """The allocations of torch's foreach AdamW step, which fake tensors cannot run (it reads its step
    count with `.item()`): the two moments, kept, and the square root of the second, a temporary."""
    grads = [p.grad for p in params]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    torch._foreach_lerp_(exp_avg, grads, 0.1)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, 0.001)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_add_(denom, 1e-8)
    torch._foreach_addcdiv_(params, exp_avg, denom, -1e-6)


def measure_sample(fam, model, sampler, batch: int, device) -> Step:
    """A sampling batch: the family's `sample` on `batch` seeds; where it cannot run on fake tensors,
    one no-grad `loss` forward at the batch stands in (FLOPs: `evaluations` × the network's)."""
    net = model.net.eval().requires_grad_(False)
    with unset_fake_temporarily():
        samples, labels = _batch(fam, model, batch)
        prepare = neon_family.member(fam, "prepare")
        prepared = prepare(samples, torch.Generator().manual_seed(0)) if prepare else samples
    tracker = _Tracker()
    with tracker:
        _hold(tracker, model)
        try:
            fam.sample(model, labels, torch.arange(batch), sampler)
            return Step(tracker.peak, tracker.flops / batch, how="sampler")
        except (RuntimeError, NotImplementedError, TypeError):  # a step fake tensors cannot take
            pass
    tracker = _Tracker()
    hooks = tracker.count_calls(net)
    with tracker, torch.no_grad():
        _hold(tracker, model)
        fam.loss(model, prepared.to(device), labels.to(device), torch.Generator().manual_seed(0))
    for hook in hooks:
        hook.remove()
    evaluations = neon_family.member(fam, "evaluations")
    flops = tracker.calls[0][0] / tracker.calls[0][1] if tracker.calls else tracker.flops / batch
    return Step(tracker.peak, (evaluations(sampler) if evaluations else 1.0) * flops, how="forward")


def _hold(tracker: _Tracker, model) -> None:
    """Count the model's tensors as live (they exist before the step)."""
    for module in filter(None, (model.net, model.codec)):
        for t in [*module.parameters(), *module.buffers()]:
            tracker.add(t)


def selection_bound(conf, snapshots: int) -> int:
    """The most images the sweep's selection generates over `snapshots` snapshots: `neon.search.max_images`
    for the recipe's strategy, halving and refinement (what `neon sweep --dry-run` prints too)."""
    return search.max_images(conf.search, snapshots, search.grid(conf.w), conf.cfg or [None], conf.num,
                             conf.screen(), conf.screen_keep, conf.refine)


def full_size(fam, recipe):
    """The recipe's full-size model on the meta device (the family's `full_size`), or None where the
    family has no such member (the plan then gives no memory or FLOPs)."""
    build = neon_family.member(fam, "full_size")
    return None if build is None else build(recipe.model.ckpt, recipe.model.arch)


def _on_meta(model):
    """A copy of `model` on the meta device (shapes only)."""
    model = copy.copy(model)
    net, codec = copy.deepcopy(model.net).to("meta"), model.codec and copy.deepcopy(model.codec).to("meta")
    return dataclasses.replace(model, net=net, codec=codec)


def _fake(model, fake_mode, device):
    """`model` (on the meta device) with fake tensors on `device`."""
    with fake_mode:
        for module in filter(None, (model.net, model.codec)):
            module.to_empty(device=device)
    return model


def plan(recipe, gpus: int = H100["gpus"], gpu_memory: float = H100["gpu_memory"],
         gpu_tflops: float = H100["gpu_tflops"], utilization: float = H100["utilization"],
         model=None) -> dict:
    """The plan of `recipe` (a `neon.recipe.Recipe` with every section) on `gpus` GPUs of `gpu_memory`
    GiB: memory, disk, images, FLOPs and GPU-hours (module docstring). `model`: measure this model (its
    shapes) instead of the family's full-size one (the tests measure a tiny model)."""
    if gpus < 1 or gpu_memory <= 0 or gpu_tflops <= 0 or not 0 < utilization <= 1:
        raise NeonError("neon plan: need --gpus >= 1, --gpu-memory > 0, --gpu-tflops > 0 and "
                        "0 < --utilization <= 1")
    fam = neon_family.get(recipe.family)
    ft, syn, sw = recipe.finetune, recipe.synthetic, recipe.sweep
    if ft.batch_size % (gpus * ft.accumulate):
        raise NeonError(f"finetune.batch_size={ft.batch_size} is not divisible by {gpus} GPUs × "
                        f"finetune.accumulate={ft.accumulate}")
    micro = ft.batch_size // (gpus * ft.accumulate)
    eval_sampler = dataclasses.replace(recipe.sampler, **sw.sampler)
    if sw.cfg:
        eval_sampler = dataclasses.replace(eval_sampler, cfg=max(sw.cfg))
    out = {"family": fam.name, "gpus": gpus, "gpu_memory_gib": gpu_memory, "gpu_tflops": gpu_tflops,
           "utilization": utilization, "finetune_batch_per_gpu": micro, "accumulate": ft.accumulate,
           "precision": ft.precision}
    model = full_size(fam, recipe) if model is None else _on_meta(model)
    if model is not None:
        device = torch.device("cpu")  # fake CUDA tensors fail in the autograd engine's device guard
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        θ_bytes = sum(t.numel() * t.element_size() for t in model.net.state_dict().values())
        codec_bytes = _bytes(model.codec)
        samples, _ = _batch(fam, model, 1)
        prepare = neon_family.member(fam, "prepare")
        prepared = prepare(samples, torch.Generator().manual_seed(0)) if prepare else samples

        def run(fn, *args):  # each measurement on a fresh fake copy: nothing carries over
            fresh = _fake(copy.deepcopy(model), fake_mode, device)
            with fake_mode:
                return fn(fam, fresh, *args, device)

        def sampling_at(sampler, batch: int) -> Step:  # linear in the batch from 4 and 8 images (seconds)
            four, eight = run(measure_sample, sampler, 4), run(measure_sample, sampler, 8)
            return Step(four.peak + (eight.peak - four.peak) * (batch - 4) // 4, eight.flops, how=eight.how)

        step = run(measure_finetune, micro, ft.precision, ft.has_ema)
        sampling = sampling_at(recipe.sampler, syn.batch_size)
        evaluations = neon_family.member(fam, "evaluations") or (lambda sampler: 1.0)
        same = sw.batch_size == syn.batch_size and evaluations(eval_sampler) == evaluations(recipe.sampler)
        evaluating = sampling if same else sampling_at(eval_sampler, sw.batch_size)
        out.update(finetune_peak_gib=step.peak / GIB, sample_peak_gib=sampling.peak / GIB,
                   sweep_peak_gib=evaluating.peak / GIB, finetune_static_gib=step.static / GIB,
                   sample_measured_by=sampling.how, params=sum(p.numel() for p in model.net.parameters()),
                   finetune_fits=step.peak / GIB <= gpu_memory)
        if not out["finetune_fits"]:
            out["advice"] = _advice(step, micro, ft.accumulate, gpu_memory)
        sample_bytes = samples[0].numel() * samples.element_size()
        host = min(gpus, 8) * (θ_bytes + codec_bytes + 4 * micro * prepared[0].numel()
                                      * prepared.element_size()) + 16 * syn.num
        out.update(host_memory_gb_per_node=host / 1e9)
    else:
        out.update(finetune_peak_gib=None, sample_peak_gib=None, sweep_peak_gib=None, finetune_fits=None)
        step = sampling = evaluating = None
    snapshots = finetune.snapshot_count(ft)
    trained = -(-ft.total_images // ft.batch_size) * ft.batch_size
    final = 2 * sw.final_seeds * sw.final_num
    selection = selection_bound(sw, snapshots)
    out.update(synthetic_images=syn.num, finetune_images=trained, selection_images=selection,
               final_images=final, snapshots=snapshots)
    if model is not None:
        moments = 2 * sum(p.numel() * p.element_size() for p in model.net.parameters())  # Adam's
        out.update(synthetic_disk_gb=syn.num * (sample_bytes + 16) / 1e9,
                   snapshots_disk_gb=snapshots * θ_bytes / 1e9,
                   state_disk_gb=(θ_bytes * (1 + ft.has_ema) + moments) / 1e9)
        flops = {"sample": syn.num * sampling.flops, "finetune": trained * step.flops,
                 "selection": selection * evaluating.flops, "final": final * evaluating.flops}
        rate = gpu_tflops * 1e12 * utilization * (1.0 if ft.precision in ("fp16", "bf16") else 0.5)
        out.update(flops=flops,
                   gpu_hours_by_step={k: v / rate / 3600 for k, v in flops.items()},
                   gpu_hours=sum(flops.values()) / rate / 3600)
    else:
        out.update(synthetic_disk_gb=None, snapshots_disk_gb=None, state_disk_gb=None, gpu_hours=None)
    base = recipe.model.base_training_images
    out["finetune_share_of_base"] = trained / base if base else None
    return out


def _advice(step: Step, micro: int, accumulate: int, gpu_memory: float) -> str:
    """What would fit: the largest per-GPU micro-batch dividing `micro` whose peak (the static part
    plus the activations, linear in the batch) fits, with the accumulation that keeps the batch."""
    per_image = max(step.peak - step.static, 0) / micro
    for b in sorted((b for b in range(1, micro + 1) if micro % b == 0), reverse=True):
        if (step.static + per_image * b) / GIB <= gpu_memory:
            return (f"finetune.accumulate {accumulate * micro // b} (per-GPU micro-batch {b}, about "
                    f"{(step.static + per_image * b) / GIB:.1f} GiB)")
    return (f"no per-GPU micro-batch fits: the weights and optimizer state alone take "
            f"{step.static / GIB:.1f} GiB")


def table(result: dict) -> str:
    """The plan as a readable table: one line per step of the recipe, then the totals."""
    hours = result.get("gpu_hours_by_step", {})

    def gib(v, unit="GiB", form=".1f"):
        return "?" if v is None else f"{v:{form}} {unit}"

    def gb(v):
        return gib(v, "GB", ",.1f")

    def h(step):
        return gib(hours.get(step), "GPU-h", ",.1f")

    fits = {True: "fits", False: "DOES NOT FIT", None: "?"}[result["finetune_fits"]]
    lines = [
        f"neon plan: family {result['family']}, {result['gpus']} GPUs of {result['gpu_memory_gib']:g} GiB, "
        f"{result['gpu_tflops']:g} TFLOP/s peak at {result['utilization']:.0%} (defaults: H100 SXM)",
        f"  sample     {result['synthetic_images']:>14,} images  peak {gib(result['sample_peak_gib'])}/GPU  "
        f"disk {gb(result['synthetic_disk_gb'])}  {h('sample')}",
        f"  finetune   {result['finetune_images']:>14,} images  peak {gib(result['finetune_peak_gib'])}/GPU "
        f"({fits}; batch {result['finetune_batch_per_gpu']}/GPU × accumulate {result['accumulate']}, "
        f"{result['precision']})  {h('finetune')}",
        f"             {result['snapshots']} snapshots {gb(result['snapshots_disk_gb'])}, training state "
        f"{gb(result['state_disk_gb'])}, host memory {gb(result.get('host_memory_gb_per_node'))}/node",
        f"  selection  {result['selection_images']:>14,} images (at most)  "
        f"peak {gib(result['sweep_peak_gib'])}/GPU  {h('selection')}",
        f"  final      {result['final_images']:>14,} images  {h('final')}",
    ]
    total = "?" if result["gpu_hours"] is None else f"{result['gpu_hours']:,.1f}"
    share = result["finetune_share_of_base"]
    lines.append(f"  total      {total} GPU-hours; the fine-tune is "
                 + ("? (model.base_training_images unset)" if share is None else f"{share:.2%}")
                 + " of the base's training images")
    if result.get("advice"):
        lines.append(f"  the fine-tune does not fit {result['gpu_memory_gib']:g} GiB: try {result['advice']}")
    if result["finetune_peak_gib"] is None:
        lines.append(f"  family {result['family']} cannot build its full-size network (no `full_size`): "
                     f"no memory or FLOPs")
    return "\n".join(lines)
