"""LoRA on quantized weights without merging it into the stored weight: the factors (up U: out×r, down D: r×in)
are cast to the compute device and dtype once and kept (per device/dtype/strength), and each forward adds them
where it is cheapest:
- into the weight the forward dequantizes anyway (W' = dequant(W) + s·U·D, one fused addmm over the weight) when
  the activation has more rows than the weight has columns — the Kontext case (8704 tokens): one pass over the
  weight costs less than one over the output;
- as a separate low-rank product on the output (y += s·(x·Dᵀ)·Uᵀ, addmm into y) otherwise (few rows, e.g. the
  modulation layers) and on the fp8 matmul path, which never materialises a dense weight.
Either way the stored quantized weight is never changed, and strength is a plain multiplier on the small factor.

A core LoRA loader's patches that the host applies per forward (low-VRAM layers, v0.29's dynamic VRAM) take the
same paths: `host_patch_low_rank` reads plain LoRAs out of them.

`LowRankDelta` is also a ComfyUI weight wrapper (`ModelPatcher.add_weight_wrapper`): called on a dense weight it
returns the merged weight, so any code path that only knows weight functions still gets the right result.
The scale follows ComfyUI's LoRA semantics (`comfy.weight_adapter.lora.LoRAAdapter.calculate_weight`):
delta = strength · (alpha / rank) · U·D, with alpha defaulting to rank.
"""
import torch


class LowRankDelta:
    def __init__(self, up: torch.Tensor, down: torch.Tensor, alpha=None, strength: float = 1.0, offset=None):
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"LoRA factors must be up (out×r) and down (r×in); got {tuple(up.shape)} and "
                             f"{tuple(down.shape)}")
        self.up, self.down = up, down
        rank = down.shape[0]
        self.alpha_scale = float(alpha) / rank if alpha is not None else 1.0
        self.strength = float(strength)
        # ComfyUI offsets are (dim, start, length) into a fused weight (e.g. q, k, v of a qkv Linear).
        if offset is not None and offset[0] != 0:
            raise ValueError("only output-dimension LoRA offsets can be applied as a low-rank product")
        self.offset = offset
        self._cast = {}

    def with_strength(self, strength: float) -> "LowRankDelta":
        """The same factors (and their device copies) at another strength: nothing is re-cast."""
        other = object.__new__(LowRankDelta)
        other.__dict__.update(self.__dict__)  # shares the factor-copy cache on purpose
        other.strength = float(strength)
        return other

    @property
    def scale(self) -> float:
        return self.strength * self.alpha_scale

    def factors(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cast:
            self._cast[key] = (self.down.to(device=device, dtype=dtype), self.up.to(device=device, dtype=dtype))
        return self._cast[key]

    def move_to(self, device=None) -> int:
        """ComfyUI's weight-function hook (model_patcher.move_weight_functions): called with the device the model
        is being loaded to; counts our factors in the host's memory accounting and drops copies kept on other
        devices, so an unloaded model leaves no LoRA factors behind in VRAM."""
        if device is None:
            return 0
        self._cast = {k: v for k, v in self._cast.items() if k[0] == str(torch.device(device))}
        return self.memory_bytes() if torch.device(device).type != "cpu" else 0

    def memory_bytes(self) -> int:  # the factors once; scaled copies are small and per strength
        return self.up.numel() * self.up.element_size() + self.down.numel() * self.down.element_size()

    def _scaled_up(self, device, dtype):
        """up · scale, cast once per (device, dtype, scale): each application is then one fused addmm."""
        key = (str(device), dtype, self.scale)
        if key not in self._cast:
            _, up = self.factors(device, dtype)
            self._cast[key] = up * self.scale
        return self._cast[key]

    def _target(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The part of `t` (a weight, dim 0, or an output, dim -1) this LoRA patches: all of it, or its offset slice."""
        return t if self.offset is None else t.narrow(dim, self.offset[1], self.offset[2])

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out += scale · (x·Dᵀ)·Uᵀ in place, into the output slice this LoRA targets.

        The second product accumulates straight into the output (addmm with beta=1), so the full-size delta is
        never materialised: one extra read of x for x·Dᵀ and one read+write of the output per LoRA.
        """
        down, _ = self.factors(x.device, x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        self._target(out.view(-1, out.shape[-1]), -1).addmm_(x2 @ down.t(), self._scaled_up(x.device, x.dtype).t())
        return out

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        """weight += scale · U·D in place (a just-dequantized weight the caller owns): one fused addmm."""
        down, _ = self.factors(weight.device, weight.dtype)
        self._target(weight, 0).addmm_(self._scaled_up(weight.device, weight.dtype), down)
        return weight

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """Merge into a dense weight (the path for layers that are not quantized)."""
        down, up = self.factors(weight.device, torch.float32)
        delta = ((up @ down) * self.scale).to(weight.dtype)  # formed in float32, as ComfyUI's LoRA math does
        if self.offset is None:
            return weight + delta
        weight = weight.clone()
        self._target(weight, 0).add_(delta)
        return weight


def stacked_factors(deltas, device, dtype):
    """(U, D) with U = [s₁·U₁ | s₂·U₂ | …] (out × Σr) and D = [D₁; D₂; …] (Σr × in), so that U·D = Σ sᵢ·Uᵢ·Dᵢ:
    several LoRAs merged by one product. None when a delta patches only an output slice (offset)."""
    if any(d.offset is not None for d in deltas):
        return None
    ups = [d._scaled_up(device, dtype) for d in deltas]
    downs = [d.factors(device, dtype)[0] for d in deltas]
    if len(deltas) == 1:
        return ups[0], downs[0]
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def merge_all(weight: torch.Tensor, deltas) -> torch.Tensor:
    """weight += Σ sᵢ·Uᵢ·Dᵢ in place. Several LoRAs go in one addmm over the weight (stacked factors): each
    separate merge is a read + write of the whole dequantized weight. Output-slice LoRAs merge one by one."""
    factors = stacked_factors(deltas, weight.device, weight.dtype) if len(deltas) > 1 else None
    if factors is None:
        for delta in deltas:
            delta.merge_into(weight)
    else:
        weight.addmm_(*factors)
    return weight


def apply_all(x: torch.Tensor, out: torch.Tensor, deltas) -> torch.Tensor:
    """out += Σ sᵢ·(x·Dᵢᵀ)·Uᵢᵀ in place; several LoRAs in one addmm over the output, as merge_all."""
    factors = stacked_factors(deltas, x.device, x.dtype) if len(deltas) > 1 else None
    if factors is None:
        for delta in deltas:
            delta.apply(x, out)
    else:
        up, down = factors
        out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ down.t(), up.t())
    return out


def split_low_rank(functions):
    """(low-rank deltas, other weight functions) from a module's weight_function list: our own deltas, and the
    plain LoRAs inside the host's per-forward patches (see host_patch_low_rank)."""
    low, other = [], []
    for f in functions:
        if isinstance(f, LowRankDelta):
            low.append(f)
            continue
        host = host_patch_low_rank(f)
        if host is None:
            other.append(f)
        else:
            low.extend(host)
    return low, other


def patch_list_low_rank(patch_list):
    """LowRankDeltas that add up to what `comfy.lora.calculate_weight` does with a patch list
    [(strength, adapter, strength_model, offset, function), ...], or None when an entry is more than a plain LoRA
    on the output dimension (a model-merge strength, a function, a nested list, a diff, DoRA, LoHa, ...)."""
    deltas = []
    for entry in patch_list:
        if not isinstance(entry, tuple) or len(entry) != 5:
            return None
        strength, value, strength_model, offset, function = entry
        delta = plain_lora_delta(value, strength, offset) if strength_model == 1.0 and function is None else None
        if delta is None:
            return None
        deltas.append(delta)
    return deltas


def host_patch_low_rank(fn):
    """The LoRA deltas behind one of ComfyUI's per-forward weight patches, or None.

    The host applies a LoRA per forward (`comfy.model_patcher.LowVramPatch`: `calculate_weight` on the dense
    weight) to the layers it does not merge at load: low-VRAM layers, and every patched layer under v0.29's
    dynamic VRAM. On a quantized layer that costs a full-size delta each forward (≈ 12 bytes of memory traffic
    per weight in bf16, more in float32), from factors copied to the device each time, and takes fp8 layers off
    the fp8 matmul. As deltas, a core LoRA loader's patches ride our low-rank paths
    instead. Read from the patcher's own patch list (never the transient `prepared_patches` copies) and cached on
    the patch object, which the host makes anew for each load: the factors are cast to the device once per load.
    """
    key, patches = getattr(fn, "key", None), getattr(fn, "patches", None)
    if not isinstance(patches, dict) or not isinstance(key, str) or key not in patches:
        return None
    patch_list = patches[key]
    cached = getattr(fn, "_klv_low_rank", None)
    if cached is not None and cached[0] is patch_list and cached[1] == len(patch_list):
        return cached[2]
    deltas = patch_list_low_rank(patch_list)
    try:
        fn._klv_low_rank = (patch_list, len(patch_list), deltas)
    except AttributeError:  # a patch object with __slots__: convert again next time
        pass
    return deltas


def lora_adapter_factors(patch):
    """(up, down, alpha) when `patch` is a plain LoRA (no DoRA, LoCon mid or reshape), else None.

    Accepts ComfyUI's `LoRAAdapter` (weights = (up, down, alpha, mid, dora_scale, reshape)) and the older
    ("lora", (up, down, alpha, mid, dora_scale, reshape)) tuples.
    """
    weights = getattr(patch, "weights", None)
    if weights is None and isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "lora":
        weights = patch[1]
    if getattr(patch, "name", "lora") != "lora" or weights is None or len(weights) < 2:
        return None
    up, down = weights[0], weights[1]
    if any(e is not None for e in weights[3:6]) or up.dim() != 2 or down.dim() != 2:  # mid / dora / reshape
        return None
    alpha = weights[2] if len(weights) > 2 else None
    return up, down, (float(alpha) if alpha is not None else None)


def plain_lora_delta(patch, strength, offset):
    """A LowRankDelta for `patch` at `strength` when it is a plain LoRA (lora_adapter_factors) on the whole
    weight or an output slice of it, else None: the one rule for what a low-rank delta can stand for."""
    factors = lora_adapter_factors(patch)
    if factors is None or (offset is not None and offset[0] != 0):
        return None
    up, down, alpha = factors
    return LowRankDelta(up, down, alpha, strength, offset)


def plan_low_rank(patches: dict, is_quantized_key) -> tuple[dict, dict]:
    """Split loaded LoRA patches into low-rank deltas for quantized weights and the rest.

    patches: what `comfy.lora.load_lora` returns, {weight key or (weight key, offset): adapter}.
    is_quantized_key(weight_key) -> bool. Returns ({weight key: [LowRankDelta, ...]} at strength 1, {rest}).
    Everything that is not a plain LoRA on a quantized weight (DoRA, LoHa, LoKr, diffs, biases, dense layers)
    stays in `rest` for the host's own patching, which already handles it correctly.
    """
    low_rank, rest = {}, {}
    for key, patch in patches.items():
        weight_key, offset = (key[0], key[1]) if isinstance(key, tuple) else (key, None)
        delta = plain_lora_delta(patch, 1.0, offset) if is_quantized_key(weight_key) else None
        if delta is None:
            rest[key] = patch
        else:
            low_rank.setdefault(weight_key, []).append(delta)
    return low_rank, rest
