"""Ray placement groups for engine replicas: one group per replica, holding all of its devices in one
bundle, so a replica's `tensor_parallel_size` GPUs (or CPUs) are always on one node."""

from dataclasses import dataclass


@dataclass(slots=True)
class ReplicaResources:
    """What one replica reserves: its actor's bundle."""

    num_cpus: int
    num_gpus: int

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": float(self.num_cpus)}
        if self.num_gpus:
            bundle["GPU"] = float(self.num_gpus)
        return bundle


def replica_resources(tensor_parallel_size: int, use_gpus: bool) -> ReplicaResources:
    """A GPU replica: its GPUs and one CPU for the actor (tensor-parallel workers are its own child
    processes). A CPU replica: one CPU per tensor-parallel rank."""
    if use_gpus:
        return ReplicaResources(num_cpus=1, num_gpus=tensor_parallel_size)
    return ReplicaResources(num_cpus=tensor_parallel_size, num_gpus=0)


def place_replicas(ray, num_replicas: int, resources: ReplicaResources, timeout_s: float) -> list:
    """Reserve one placement group per replica and wait (at most `timeout_s`) until all are placed.
    If the cluster cannot hold them, remove them again and raise a ValueError with what was asked and
    what the cluster has."""
    from ray.util.placement_group import placement_group, remove_placement_group

    check_fits(ray, num_replicas, resources)
    groups = [placement_group([resources.bundle()], strategy="STRICT_PACK") for _ in range(num_replicas)]
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=num_replicas, timeout=timeout_s)
    if len(ready) < num_replicas:
        for g in groups:
            remove_placement_group(g)
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        raise ValueError(
            f"data_parallel_size={num_replicas}: could place only {len(ready)} of {num_replicas} replicas "
            f"within {timeout_s:g} s; each needs {resources.bundle()} on one node, and the Ray cluster has "
            f"{total} in all (some may be taken by other work)"
        )
    return groups


def check_fits(ray, num_replicas: int, resources: ReplicaResources) -> None:
    """A ValueError at once when the cluster's nodes could not hold `num_replicas` bundles even empty
    (otherwise placing would only time out)."""
    fits = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        per_node = int(have.get("CPU", 0) // resources.num_cpus) if resources.num_cpus else num_replicas
        if resources.num_gpus:
            per_node = min(per_node, int(have.get("GPU", 0) // resources.num_gpus))
        fits += per_node
    if fits < num_replicas:
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        raise ValueError(
            f"data_parallel_size={num_replicas}: each replica needs {resources.bundle()} on one node, and "
            f"the Ray cluster's nodes ({total} in all) can hold only {fits} such replicas"
        )


def remove_groups(groups: list) -> None:
    from ray.util.placement_group import remove_placement_group

    for g in groups:
        try:
            remove_placement_group(g)
        except Exception:  # already removed, or the cluster is gone: nothing left to free
            pass
