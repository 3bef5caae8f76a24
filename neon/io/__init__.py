"""Every byte that reaches a disk, one concern a module (DESIGN.md "Layout"): `checkpoint` (θ containers,
formats, `weights_only` loading, layouts), `files` (atomic writes, stale temporaries, the output check and
lock, JSON/JSONL, sha256, downloads), `safetensors` (streamed tensors), `unpickle` (the restricted
unpickler), `rows` (`.npz` row reading). Only this package calls `torch.load`, `torch.save`, pickle or
`os.replace`; it names no family.
"""
