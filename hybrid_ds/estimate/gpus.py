"""Accelerators the estimator knows: memory, peak FLOP/s and link bandwidths. Pure data, no torch.

Peak FLOP/s are the dense (no 2:4 sparsity) tensor-core numbers of each vendor datasheet; ``fp32`` is
the plain FP32 rate, because PyTorch does not use TF32 for matrix multiplies unless told to
(``torch.backends.cuda.matmul.allow_tf32`` is off by default). Bandwidths are per GPU and per
direction, in bytes/s: ``intra_node`` is what one GPU can send to its peers inside a node (NVLink, or
PCIe peer-to-peer), ``inter_node`` its share of the node's network adapters.

>>> get_gpu("a100").flops["bf16"] / 1e12
312.0
>>> parse_memory("40GB"), parse_memory("80GiB") == 80 * 2**30
(40000000000, True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hybrid_ds.errors import UserError, suggest

TERA, GIGA = 1e12, 1e9


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int                   # bytes (the marketed GB, 10^9)
    flops: dict[str, float]       # peak dense FLOP/s by training precision: "bf16", "fp16", "fp32"
    intra_node: float             # bytes/s per direction to a GPU in the same node
    inter_node: float             # bytes/s per direction to another node (this GPU's share)
    per_node: int                 # GPUs in the usual node
    source: str


def _gpu(name, memory_gb, bf16, fp16, fp32, intra_gbs, inter_gbs, per_node, source):
    flops = {"bf16": bf16 * TERA, "fp16": fp16 * TERA, "fp32": fp32 * TERA}
    return GPU(name, int(memory_gb * GIGA), flops, intra_gbs * GIGA, inter_gbs * GIGA, per_node, source)


# NVLink numbers are the datasheets' total bidirectional bandwidth halved; network is the usual
# one adapter per GPU (H100/H200: 400 Gb/s NDR = 50 GB/s, A100: 200 Gb/s HDR = 25 GB/s, V100: 100 Gb/s
# EDR = 12.5 GB/s); PCIe cards: PCIe 4.0 x16 peer-to-peer ~25 GB/s and 100 Gb/s networking.
_TABLE = [
    _gpu("h100", 80, 989.4, 989.4, 66.9, 450, 50, 8, "NVIDIA H100 SXM5 datasheet; NVLink 4 900 GB/s"),
    _gpu("h200", 141, 989.4, 989.4, 66.9, 450, 50, 8, "NVIDIA H200 SXM datasheet; NVLink 4 900 GB/s"),
    _gpu("a100", 80, 312, 312, 19.5, 300, 25, 8, "NVIDIA A100 SXM4 80GB datasheet; NVLink 3 600 GB/s"),
    _gpu("a100-40gb", 40, 312, 312, 19.5, 300, 25, 8, "NVIDIA A100 SXM4 40GB datasheet; NVLink 3 600 GB/s"),
    # V100 has no bf16 units: PyTorch runs bf16 matmuls at roughly the fp32 rate.
    _gpu("v100", 32, 15.7, 125, 15.7, 150, 12.5, 8, "NVIDIA V100 SXM2 32GB datasheet; NVLink 2 300 GB/s"),
    _gpu("l40s", 48, 362, 362, 91.6, 25, 12.5, 8, "NVIDIA L40S datasheet (PCIe 4.0)"),
    _gpu("a10g", 24, 125, 125, 31.2, 25, 12.5, 8, "NVIDIA A10 datasheet (PCIe 4.0)"),
    _gpu("rtx4090", 24, 165.2, 165.2, 82.6, 25, 12.5, 8, "NVIDIA Ada GPU architecture whitepaper, RTX 4090"),
]
GPUS: dict[str, GPU] = {g.name: g for g in _TABLE}
# Names as people write them (and as configs/*.json descriptions spell the cluster).
_ALIASES = {"h100-80gb": "h100", "h200-141gb": "h200", "a100-80gb": "a100", "v100-32gb": "v100",
            "l40s-48gb": "l40s", "a10g-24gb": "a10g", "a10": "a10g", "rtx4090-24gb": "rtx4090"}


def get_gpu(name: str) -> GPU:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in GPUS:
        raise UserError("--gpu", f"unknown GPU {name!r}; {suggest(name.lower(), [*GPUS, *_ALIASES])}")
    return GPUS[key]


def parse_memory(text: str) -> int:
    """``80GB`` (10^9), ``80GiB`` (2^30), ``512MB``, or plain bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?b?)?\s*", text.lower())
    if not match:
        raise UserError("--gpu-mem", f"expected a size such as 80GB or 40GiB, got {text!r}")
    value, unit = float(match.group(1)), (match.group(2) or "b").rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(value * scale)


_CLUSTER = re.compile(r"(\d+)\s*x\s*([A-Za-z][A-Za-z0-9]*)(?:-(\d+)\s*GB)?", re.IGNORECASE)


def parse_cluster(description: str) -> tuple[int, GPU, int] | None:
    """(GPUs, GPU, memory bytes) from text such as "128x A100-80GB (16 nodes of 8)", else None.

    >>> n, gpu, mem = parse_cluster("one 8x A100-40GB node as 2 stages x 4 dp")
    >>> n, gpu.name, mem
    (8, 'a100-40gb', 40000000000)
    """
    for match in _CLUSTER.finditer(description):
        count, model, memory_gb = match.groups()
        name = f"{model}-{memory_gb}gb" if memory_gb else model
        key = _ALIASES.get(name.lower(), name.lower())
        if key not in GPUS:
            key = _ALIASES.get(model.lower(), model.lower())
        if key in GPUS:
            memory = int(memory_gb) * int(GIGA) if memory_gb else GPUS[key].memory
            return int(count), GPUS[key], memory
    return None


@dataclass(frozen=True)
class Cluster:
    """``gpus`` accelerators of one kind in ``nodes`` nodes; ``memory`` may override the GPU's (``--gpu-mem``)."""

    gpus: int
    gpu: GPU
    memory: int
    nodes: int

    @property
    def per_node(self) -> int:
        return -(-self.gpus // self.nodes)

    def describe(self) -> str:
        nodes = f", {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{self.gpus}x {self.gpu.name} {self.memory / GIGA:g}GB{nodes}"


def make_cluster(gpus: int, gpu: str | GPU = "h100", memory: int | None = None, nodes: int | None = None) -> Cluster:
    """A cluster; nodes default to full nodes of the GPU's usual size.

    >>> make_cluster(16, "a100").describe()
    '16x a100 80GB, 2 nodes'
    """
    gpu = gpu if isinstance(gpu, GPU) else get_gpu(gpu)
    if gpus < 1:
        raise UserError("--gpus", f"must be >= 1, got {gpus}")
    nodes = -(-gpus // gpu.per_node) if nodes is None else nodes
    if nodes < 1 or nodes > gpus:
        raise UserError("--nodes", f"must be between 1 and --gpus {gpus}, got {nodes}")
    return Cluster(gpus, gpu, memory or gpu.memory, nodes)
