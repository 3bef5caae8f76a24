"""The float-precision policy of CUDA kernels, one setting per phase of the method.

PyTorch's defaults are not a choice: cuBLAS matmuls run in full float32 while cuDNN convolutions
silently use TF32 (10-bit mantissa) on Ampere and later, so the EDM U-Net, the VAEs and Inception
would run at another precision than the transformers. `apply(phase)` states it per phase:

* 'finetune': TF32 off for matmuls and convolutions, as EDM's and IMM's trainers set it
  (`NVlabs/edm:training/training_loop.py`, IMM's `enable_tf32: false`): the EDM rows fine-tune in
  float32, and the fine-tune's step is a small move of θ that TF32's rounding would blur. VAR's and
  xAR's trainers leave TF32 on, but they train under fp16 autocast, where TF32 reaches only the few
  float32 ops (norms, the loss); `tf32=True` gives their setting.
* 'sample': TF32 off for matmuls, on for cuDNN convolutions: the defaults under which EDM's
  `generate.py` (which sets nothing) drew the paper's base samples; VAR, xAR and IMM sample under
  fp16 autocast, where TF32 does not apply.
* 'features': TF32 off: Inception features in full float32, as the reference statistics were
  computed, since the FID differences the sweep ranks are of order 0.01.

`cudnn.benchmark` stays off in every phase, unlike EDM's trainer (`--bench True`): it times
algorithms per run and may pick another one the next run, which breaks the bitwise contract of
DESIGN.md (Determinism: the same bytes resumed or not). On a machine without CUDA the flags are set
all the same and change nothing.
"""

import torch

PHASES = ("finetune", "sample", "features")

# phase -> (cuBLAS matmul TF32, cuDNN TF32)
_TF32 = {"finetune": (False, False), "sample": (False, True), "features": (False, False)}


def apply(phase: str, tf32: bool | None = None) -> None:
    """Set torch.backends' TF32 and cudnn.benchmark flags for `phase` ('finetune', 'sample' or
    'features'); `tf32` True/False overrides the phase's TF32 choice for both matmuls and
    convolutions (a recipe that wants VAR's or xAR's upstream setting). Process-wide: call it at the
    start of the phase, on every rank."""
    if phase not in PHASES:
        raise ValueError(f"precision: unknown phase {phase!r} (known: {', '.join(PHASES)})")
    matmul, conv = _TF32[phase] if tf32 is None else (tf32, tf32)
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = conv
    torch.backends.cudnn.benchmark = False
