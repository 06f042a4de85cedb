"""Which replica runs which request: requests weighed by the tokens they can cost, then spread so that
every replica gets about the same weight (not the same count)."""

import heapq

from nanovllm.sampling_params import SamplingParams


def request_cost(num_prompt_tokens: int, params: SamplingParams, max_model_len: int) -> int:
    """The tokens a request can cost its replica: the prompt (prefilled once) plus, for each of its `n`
    completions, `max_tokens` (capped where `max_model_len` ends the sequence first)."""
    completion = max(0, min(params.max_tokens, max_model_len - num_prompt_tokens))
    return num_prompt_tokens + params.n * completion


def assign(costs: list[int], loads: list[int]) -> list[list[int]]:
    """Spread requests (by index into `costs`) over replicas already carrying `loads`: the heaviest
    request first, each to the replica with the least weight so far (ties: the lower replica). Each
    replica's share is returned in request order."""
    if not loads:
        raise ValueError("no replica to assign requests to")
    heap = [(load, r) for r, load in enumerate(loads)]
    heapq.heapify(heap)
    shares: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        shares[r].append(i)
        heapq.heappush(heap, (load + costs[i], r))
    return [sorted(share) for share in shares]
