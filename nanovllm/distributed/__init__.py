"""Process groups and their teardown, and engine replicas on Ray. This package holds vLLM's
`cleanup_dist_env_and_memory`, which scripts call between two engines in one process; the Ray modules
(data_parallel, dispatcher, replica, balance, placement, ray_utils, ray_data) are imported on demand, so Ray
stays optional."""

import gc

import torch
import torch.distributed as dist


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    """Destroy the torch.distributed process group if one is initialised, shut Ray down when asked
    (and when it is installed and running), collect garbage, and on CUDA wait for the device and hand
    cached memory back to the driver. Safe to call any number of times, on a machine without a GPU too.
    Call it after the engine is gone (`llm.exit()` or `del llm`): it does not stop a live engine."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if shutdown_ray:
        try:
            import ray
        except ImportError:
            ray = None
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    gc.collect()
    # is_initialized(): a process that never touched CUDA gets no CUDA context from this call.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


__all__ = ["cleanup_dist_env_and_memory"]
