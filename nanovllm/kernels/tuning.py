"""Launch configurations measured per GPU model, for kernels whose best tiles differ between cards.

Each table maps a device-name key (a substring of `torch.cuda.get_device_name`, e.g. "H200") to that
card's configuration, or, where it depends on the batch, to rows of (largest batch the row applies to,
configuration), the first row whose bound holds being used. A device with no entry keeps the kernel's
own defaults (first guesses for an H100). Values come from the sweeps in
`benchmarks/` (each table says which), and RESULTS.md records the runs.
"""

from typing import NamedTuple

import torch

from nanovllm.kernels.device import device_name


class DecodeConfig(NamedTuple):
    tile_n: int  # KV tokens per loop iteration
    num_warps: int
    num_stages: int


# benchmarks/tune_attention.py on an H200, 2026-12-02 (results/2026-12-02_h200_tune_attention_995dada.json):
# bf16, head_dim 128, block 256. At batches of 32 and more, 128-token tiles with 2 stages beat the defaults
# (64, 4 warps, 3 stages) by 2-7% (256 x [200, 1600] tokens: 251 -> 245 us; 32 x [800, 2000]: 67 -> 63 us);
# at 1 and 8 sequences 64-token tiles with 2 warps and 2 stages are best by 2-3%.
DECODE_CONFIGS: dict[str, tuple[tuple[int, DecodeConfig], ...]] = {
    "H200": ((16, DecodeConfig(64, 2, 2)), (1 << 30, DecodeConfig(128, 4, 2))),
}


class PrefillConfig(NamedTuple):
    block_m: int  # query rows per program (query tokens x the query heads of one KV head)
    block_n: int  # keys per loop iteration
    num_warps: int
    num_stages: int


# benchmarks/tune_prefill.py on an H200 (results/2026-12-03_h200_tune_prefill.txt): bf16, head_dim 128,
# block 256. With the loop of b3040b2 (raw-score row max, tile pointers), 128 x 128 tiles at 8 warps and
# 2 stages beat the earlier row (128 x 64, 4 warps, 2 stages: 203 / 402 / 371 TFLOP/s on 16 short prompts
# / the first 16K chunk / a 16K chunk after 57K cached, with the old loop) at 194 / 456 / 388; a whole
# 128K prompt's attention 195 -> 179 ms a layer. The new loop at 4 warps spills on contiguous keys (92 /
# 152 / 350).
PREFILL_CONFIGS: dict[str, PrefillConfig] = {"H200": PrefillConfig(128, 128, 8, 2)}


def _entry(table: dict, device: torch.device):
    """The value of the first key of `table` in this CUDA device's name, or None."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    return next((value for key, value in table.items() if key in name), None)


def prefill_config(device: torch.device) -> PrefillConfig | None:
    """The measured prefill-attention configuration for this device, or None (the kernel's defaults)."""
    return _entry(PREFILL_CONFIGS, device)


def decode_config(device: torch.device, batch: int) -> DecodeConfig | None:
    """The measured decode-attention configuration for this device and batch, or None (defaults)."""
    rows = _entry(DECODE_CONFIGS, device)
    return None if rows is None else next((cfg for bound, cfg in rows if batch <= bound), None)
