"""What a CLEAR distillation of a FLUX-class model needs: device memory and compute, by a
stated model (an estimate: no FLUX-size run was measured), for the README's tables
(``python scripts/clear_distill_cost.py --readme`` prints them).

Memory, for one training sample at a time (a batch adds its samples' gradients one after the
other, so its size does not change the peak):

- frozen weights: every parameter of the model in its storage precision (bf16: 2 bytes,
  fp8: 1 byte; ComfyUI casts a layer to bf16 when it runs);
- trainable state: the released file's tensors in float32, their float32 gradients and AdamW's
  two float32 moments: 16 bytes per trained parameter; with the optimizer in RAM
  (:class:`ultrares.models.training.OffloadedAdamW`) the device keeps 2 bytes per trained
  parameter (their bf16 copies; each gradient leaves as soon as it is complete) and the 16
  bytes are host memory;
- activations (bf16): each block's inputs, kept for its recomputation (2 bytes per token and
  channel per block); the distilled layers' attention outputs, student and teacher (2 bytes
  each); the one block being recomputed and differentiated (:data:`BLOCK_BYTES`: the tensors
  a FLUX double block keeps for its backward pass, counted from ComfyUI's block code, plus the
  gradients in flight); the CLEAR op's backward workspace (its tile budget, x3);
- a fixed reserve for the CUDA context, ComfyUI and allocator fragmentation.

Compute (also an estimate): forward FLOPs ``2 x parameters x tokens`` (the linear layers; CLEAR's attention adds
little at these sizes); one training sample = teacher forward + student forward + its
recomputation + backward (about 1.3 forwards: input gradients everywhere, weight gradients only
for the trained projections), 4.3 forwards; one teacher sample = ``sampling_steps`` forwards.
Seconds follow from an assumed sustained throughput (:data:`GPUS`); with the optimizer in RAM
add each sample's gradients crossing PCIe (:data:`PCIE_BYTES_PER_SECOND`) and a host AdamW step
per optimiser step (:data:`HOST_STEP_SECONDS`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .distill import attention_loss_blocks

GIB = 2 ** 30
RESERVE_BYTES = int(1.5 * GIB)           # CUDA context, ComfyUI, allocator fragmentation (assumed)
ACTIVATION_BYTES = 2                      # bf16 activations
BLOCK_BYTES = 52 + 18                     # per token and channel: a double block's saved tensors + gradients
CLEAR_WORKSPACE_BYTES = 3 * 256 * 2 ** 20  # the torch path's key-copy budget, forward recomputation and gradients
TRAINABLE_STATE_BYTES = 4 + 4 + 8         # float32 value, gradient, AdamW's two moments
TRAINING_FORWARDS = 4.3                   # teacher + student + recomputation + backward, in forward passes
PATCH = 16                                # pixels per token side (VAE 8 x patch 2)
OFFLOADED_DEVICE_BYTES = 2                # bf16 copies of the trained tensors on the device
PCIE_BYTES_PER_SECOND = 20e9              # gradients to host memory (PCIe 4.0 x16, assumed sustained)
HOST_STEP_SECONDS = 2.0                   # AdamW over 1.8 B float32 parameters on the host CPU (assumed)


@dataclass(frozen=True)
class FluxShape:
    """A FLUX.1-layout model's sizes."""

    hidden: int = 3072
    mlp_ratio: float = 4.0
    depth: int = 19
    depth_single: int = 38
    latent_channels: int = 16
    context_dim: int = 4096
    vec_dim: int = 768
    text_tokens: int = 512

    def parameters(self) -> int:
        """Every parameter of the network (FLUX.1-dev: 11.9 B)."""
        h, m = self.hidden, int(self.hidden * self.mlp_ratio)
        linear = lambda i, o: i * o + o  # noqa: E731
        stream = linear(h, 6 * h) + linear(h, 3 * h) + linear(h, h) + linear(h, m) + linear(m, h) + 2 * (h // 24)
        single = linear(h, 3 * h + m) + linear(h + m, h) + linear(h, 3 * h) + 2 * (h // 24)
        mlp_embed = lambda i: linear(i, h) + linear(h, h)  # noqa: E731
        rest = (linear(4 * self.latent_channels, h) + mlp_embed(256) + mlp_embed(256) + mlp_embed(self.vec_dim)
                + linear(self.context_dim, h) + linear(h, 2 * h) + linear(h, 4 * self.latent_channels))
        return self.depth * 2 * stream + self.depth_single * single + rest

    def trained_parameters(self) -> int:
        """The tensors of a released CLEAR file: q, k, v of every block, out of every double block."""
        projection = self.hidden * self.hidden + self.hidden
        return (3 * (self.depth + self.depth_single) + self.depth) * projection

    def tokens(self, resolution: int) -> int:
        """Text + image tokens of a square image of ``resolution`` pixels."""
        return self.text_tokens + (resolution // PATCH) ** 2


FLUX1 = FluxShape()


@dataclass(frozen=True)
class MemoryEstimate:
    """Device bytes by part (see the module docstring)."""

    frozen_weights: int
    trainable_state: int
    activations: int
    reserve: int = RESERVE_BYTES
    host_state: int = 0          # host memory of an optimizer in RAM

    @property
    def total(self) -> int:
        return self.frozen_weights + self.trainable_state + self.activations + self.reserve


def training_memory(shape: FluxShape, resolution: int, weight_bytes: float,
                    optimizer_on_cpu: bool = False) -> MemoryEstimate:
    """Peak device memory of CLEAR distillation at ``resolution`` with weights of ``weight_bytes`` each."""
    elements = shape.tokens(resolution) * shape.hidden
    kept = (shape.depth + shape.depth_single + 2 * len(attention_loss_blocks(shape.depth, shape.depth_single)))
    activations = elements * (kept * ACTIVATION_BYTES + BLOCK_BYTES) + CLEAR_WORKSPACE_BYTES
    trained = shape.trained_parameters()
    return MemoryEstimate(frozen_weights=int(shape.parameters() * weight_bytes),
                          trainable_state=trained * (OFFLOADED_DEVICE_BYTES if optimizer_on_cpu else TRAINABLE_STATE_BYTES),
                          activations=int(activations),
                          host_state=trained * TRAINABLE_STATE_BYTES if optimizer_on_cpu else 0)


def forward_flops(shape: FluxShape, resolution: int) -> float:
    """FLOPs of one forward pass (the linear layers)."""
    return 2.0 * shape.parameters() * shape.tokens(resolution)


@dataclass(frozen=True)
class Gpu:
    """A GPU class: memory and an assumed sustained bf16 throughput (40 % of its dense peak)."""

    name: str
    memory_gib: float
    sustained_tflops: float


GPUS = (Gpu("24 GB (RTX 4090 class)", 24, 0.4 * 165), Gpu("48 GB (L40S / RTX 6000 Ada class)", 48, 0.4 * 362),
        Gpu("80 GB (A100 80GB)", 80, 0.4 * 312), Gpu("80 GB (H100)", 80, 0.4 * 989))


def training_hours(gpu: Gpu, shape: FluxShape, resolution: int, steps: int, batch: int, samples: int,
                   sampling_steps: int, optimizer_on_cpu: bool = False) -> float:
    """Hours for ``samples`` teacher samples and ``steps x batch`` training samples on ``gpu``."""
    forward = forward_flops(shape, resolution)
    flops = samples * sampling_steps * forward + steps * batch * TRAINING_FORWARDS * forward
    seconds = flops / (gpu.sustained_tflops * 1e12)
    if optimizer_on_cpu:
        transfer = shape.trained_parameters() * OFFLOADED_DEVICE_BYTES / PCIE_BYTES_PER_SECOND
        seconds += steps * (batch * transfer + HOST_STEP_SECONDS)
    return seconds / 3600


RESOLUTIONS = (512, 1024, 1536, 2048)
CONFIGURATIONS = (  # (frozen weights, bytes per weight, optimizer in RAM), in order of preference
    ("bf16", 2, False), ("fp8", 1, False), ("fp8", 1, True), ("bf16", 2, True))
RECIPES = (  # (label, teacher samples, steps, batch)
    ("the paper: 10K samples, 10K steps of 32 (the reference script's effective batch)", 10_000, 10_000, 32),
    ("10K samples, 10K steps of 1", 10_000, 10_000, 1),
    ("1K samples, 2K steps of 1", 1_000, 2_000, 1),
)
RECIPE_RESOLUTION, RECIPE_SAMPLING_STEPS = 1024, 20


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def _where(on_cpu: bool) -> str:
    return "RAM" if on_cpu else "GPU"


def memory_table(shape: FluxShape = FLUX1) -> str:
    """The README's memory table (markdown): GiB by part, and which GPU sizes it fits."""
    sizes = sorted({gpu.memory_gib for gpu in GPUS})
    head = ["weights", "optimizer", "resolution", "frozen weights", "trained tensors", "activations", "reserve",
            "GPU total", "RAM for the optimizer", *(f"fits {size:g} GB" for size in sizes)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, weight_bytes, on_cpu in CONFIGURATIONS:
        for resolution in RESOLUTIONS:
            m = training_memory(shape, resolution, weight_bytes, on_cpu)
            fits = ["yes" if m.total <= size * GIB else "no" for size in sizes]
            rows.append("| " + " | ".join([label, _where(on_cpu), f"{resolution}²", _gib(m.frozen_weights),
                                           _gib(m.trainable_state), _gib(m.activations), _gib(m.reserve),
                                           _gib(m.total), _gib(m.host_state) if on_cpu else "–", *fits]) + " |")
    return "\n".join(rows)


def time_table(shape: FluxShape = FLUX1) -> str:
    """The README's time table (markdown): hours per recipe and GPU class, in the first
    configuration of :data:`CONFIGURATIONS` that fits (or why none does)."""
    head = ["recipe", *(gpu.name for gpu in GPUS)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, samples, steps, batch in RECIPES:
        cells = []
        for gpu in GPUS:
            fitting = [(name, on_cpu) for name, weight_bytes, on_cpu in CONFIGURATIONS
                       if training_memory(shape, RECIPE_RESOLUTION, weight_bytes, on_cpu).total <= gpu.memory_gib * GIB]
            if not fitting:
                cells.append("does not fit")
                continue
            name, on_cpu = fitting[0]
            hours = training_hours(gpu, shape, RECIPE_RESOLUTION, steps, batch, samples, RECIPE_SAMPLING_STEPS, on_cpu)
            cells.append(f"{hours:.0f} h ({name} weights, optimizer {'in RAM' if on_cpu else 'on the GPU'})")
        rows.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(rows)
