"""The per-device launch tables: which configuration a device and batch get, and the fallbacks."""

import torch

import nanovllm.kernels.paged_attention as pa
from nanovllm.kernels import tuning


def test_decode_config_by_device_name_and_batch(monkeypatch) -> None:
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(tuning, "device_name", lambda device: "NVIDIA H200")
    assert tuning.decode_config(cuda, 1) == tuning.DecodeConfig(64, 2, 2)
    assert tuning.decode_config(cuda, 16) == tuning.DecodeConfig(64, 2, 2)
    assert tuning.decode_config(cuda, 17) == tuning.DecodeConfig(128, 4, 2)
    assert tuning.decode_config(cuda, 512) == tuning.DecodeConfig(128, 4, 2)
    monkeypatch.setattr(tuning, "device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    assert tuning.decode_config(cuda, 256) is None  # not measured: the kernel's defaults
    assert tuning.decode_config(torch.device("cpu"), 256) is None


def test_decode_launch_falls_back_where_the_table_does_not_apply(monkeypatch) -> None:
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(tuning, "device_name", lambda device: "NVIDIA H200")
    defaults = (pa.DECODE_TILE_N, pa.DECODE_NUM_WARPS, pa.DECODE_NUM_STAGES)
    assert pa._decode_launch(cuda, torch.bfloat16, 256, 256, 128) == (128, 4, 2)
    assert pa._decode_launch(cuda, torch.bfloat16, 256, 64, 128) == (64, 4, 3)  # a 128 tile spans blocks
    assert pa._decode_launch(cuda, torch.bfloat16, 256, 256, 64) == defaults  # measured at head_dim 128 only
    fp32 = pa._decode_launch(cuda, torch.float32, 256, 256, 128)
    assert fp32 == (pa.DECODE_TILE_N_FP32, pa.DECODE_NUM_WARPS, pa.DECODE_NUM_STAGES_FP32)


def test_prefill_config_by_device_name_and_its_fallbacks(monkeypatch) -> None:
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(tuning, "device_name", lambda device: "NVIDIA H200")
    assert tuning.prefill_config(cuda) == tuning.PrefillConfig(128, 128, 8, 2)
    assert pa._prefill_config(128, torch.bfloat16, cuda) == (128, 128, 8, 2)
    assert pa._prefill_config(128, torch.float16, cuda) == (128, 128, 8, 2)
    defaults_64 = (pa.PREFILL_BLOCK_M, pa.PREFILL_BLOCK_N, pa.PREFILL_NUM_WARPS[64], pa.PREFILL_NUM_STAGES)
    assert pa._prefill_config(64, torch.bfloat16, cuda) == defaults_64  # measured at head_dim 128 only
    fp32 = (
        pa.PREFILL_BLOCK_M_FP32,
        pa.PREFILL_BLOCK_N_FP32,
        pa.PREFILL_NUM_WARPS[128],
        pa.PREFILL_NUM_STAGES_FP32,
    )
    assert pa._prefill_config(128, torch.float32, cuda) == fp32
    defaults_128 = (pa.PREFILL_BLOCK_M, pa.PREFILL_BLOCK_N, pa.PREFILL_NUM_WARPS[128], pa.PREFILL_NUM_STAGES)
    assert pa._prefill_config(128, torch.bfloat16) == defaults_128  # no device given
    assert pa._prefill_config(128, torch.bfloat16, torch.device("cpu")) == defaults_128
    monkeypatch.setattr(tuning, "device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    assert tuning.prefill_config(cuda) is None
    assert pa._prefill_config(128, torch.bfloat16, cuda) == defaults_128
