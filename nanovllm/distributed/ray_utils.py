"""Ray, imported only when replicas are asked for, and the cluster they run on."""

import os

# The hint every "Ray is missing" error gives.
INSTALL_HINT = "pip install 'nano-vllm[ray]'"


def import_ray():
    """The `ray` module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            "data_parallel_size > 1 runs engine replicas as Ray actors, and Ray is not installed: "
            + INSTALL_HINT
        ) from None
    return ray


def connect(ray) -> None:
    """Use the Ray instance this process is already connected to (`ray.init(address=...)` before the
    LLM); else `ray.init()`, which joins the cluster RAY_ADDRESS names or, without it, starts a local
    instance (Ray's own rules)."""
    if ray.is_initialized():
        return
    # Replicas are fresh processes that import nanovllm; a tokenizer there need not fork-warn.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init()


def uses_gpus(ray, device: str) -> bool:
    """Whether replicas take GPUs: `device="auto"` means yes when the cluster has any, "cpu" never."""
    if device == "cpu":
        return False
    if device == "cuda":
        return True
    return ray.cluster_resources().get("GPU", 0) > 0
