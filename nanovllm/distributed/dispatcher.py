"""One `generate`/`stream` call spread over engine replicas: requests go out balanced by the tokens
they can cost, results come back as each replica streams them, and a replica lost on the way has its
unfinished requests run again on the others.

Every wait is bounded: a replica sends at least a heartbeat every few seconds while it runs requests
(replica.HEARTBEAT_S), so one that sends nothing for `replica_timeout_s` is taken as lost (and killed,
so a late answer cannot duplicate a result). A replica is lost once per LLM: later calls use the others.
An error raised inside a replica (a step that failed) ends the call with that error.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from time import monotonic

from nanovllm.distributed.balance import assign
from nanovllm.distributed.replica import WorkItem

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Replica:
    """A replica actor, where it runs, and why it was given up on (None while it serves)."""

    index: int
    actor: object
    info: dict
    lost: str | None = None

    @property
    def name(self) -> str:
        return f"replica {self.index} (pid {self.info['pid']} on node {self.info['node_ip']})"


@dataclass(slots=True, eq=False)
class _Run:
    """One replica's share of the call: the call's positions it runs, in the order it was sent them."""

    replica: Replica
    run_id: int
    positions: list[int]
    deadline: float
    started: bool = False  # its first item (the engine's request ids) has come


@dataclass(slots=True)
class _Sent:
    """What a stream has yielded of one completion; while a rerun catches up, what the rerun has made
    again (held back until it passes what was already yielded, and checked against it)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    replay_tokens: list[int] | None = None
    replay_text: str = ""
    finished: bool = False  # its last piece was yielded: a rerun's pieces of it are dropped
    lost_on: str = ""  # the replica whose loss started the rerun (for the error if it diverges)

    def rerun_after(self, lost_replica: str) -> None:
        """Its request runs again from the start elsewhere: hold the rerun's pieces back until they
        pass what was already yielded."""
        self.replay_tokens, self.replay_text, self.lost_on = [], "", lost_replica


class Dispatch:
    """The state of one call. `results()` yields `(position, RequestOutput)` for each request as it
    finishes (mode "generate") or `(position, piece)` for each new `stream()` piece (mode "stream");
    `cancel()` ends what is still running (call it in a `finally`)."""

    def __init__(
        self,
        ray,
        replicas: list[Replica],
        work: list[WorkItem],
        costs: list[int],
        request_ids: list[str],
        mode: str,
        run_ids: Iterator[int],
        replica_timeout_s: float,
        on_placed=None,
    ):
        self.ray = ray
        self.replicas = replicas
        self.work = work
        self.costs = costs
        self.request_ids = request_ids
        self.mode = mode
        self.run_ids = run_ids
        self.replica_timeout_s = replica_timeout_s
        # on_placed(request id, replica, the engine's request id): where a request now runs (for aborts).
        self.on_placed = on_placed
        self.done = [False] * len(work)
        self.runs: dict[object, _Run] = {}  # by the run's ObjectRefGenerator
        self.sent: dict[tuple[int, int], _Sent] = {}  # stream: by (position, completion)

    # ---- sending -------------------------------------------------------------------------------

    def start(self) -> None:
        live = [r for r in self.replicas if r.lost is None]
        if not live:
            lost = "; ".join(f"{r.name}: {r.lost}" for r in self.replicas)
            raise RuntimeError(f"every replica of this LLM has been lost ({lost}); create a new LLM")
        self._send(list(range(len(self.work))), live)

    def _send(self, positions: list[int], replicas: list[Replica]) -> None:
        # Weigh what each replica still runs for this call, so a rerun goes to the least loaded.
        loads = [
            sum(self.costs[p] for run in self.runs.values() if run.replica is r for p in run.positions)
            for r in replicas
        ]
        shares = assign([self.costs[p] for p in positions], loads)
        for replica, share in zip(replicas, shares):
            if share:
                mine = [positions[i] for i in share]
                run_id = next(self.run_ids)
                gen = replica.actor.run.options(num_returns="streaming").remote(
                    run_id, [self.work[p] for p in mine], self.mode
                )
                self.runs[gen] = _Run(replica, run_id, mine, monotonic() + self.replica_timeout_s)

    def cancel(self) -> None:
        """Ask every replica still running part of this call to abort it (not waited for)."""
        for run in self.runs.values():
            if run.replica.lost is None:
                try:
                    run.replica.actor.cancel.remote(run.run_id)
                except Exception:  # the actor is gone: nothing of it to cancel
                    pass
        self.runs.clear()

    # ---- receiving -----------------------------------------------------------------------------

    def results(self) -> Iterator[tuple[int, object]]:
        ray = self.ray
        while self.runs:
            wait_s = max(0.0, min(run.deadline for run in self.runs.values()) - monotonic())
            ready, _ = ray.wait(list(self.runs), num_returns=1, timeout=wait_s)
            if not ready:
                for run in list(self.runs.values()):
                    if run.deadline <= monotonic() and run.replica.lost is None:
                        self._lose(run.replica, f"it sent nothing for {self.replica_timeout_s:g} s")
                continue
            gen = ready[0]
            run = self.runs[gen]
            try:
                value = ray.get(next(gen), timeout=self.replica_timeout_s)
            except StopIteration:
                del self.runs[gen]
                unfinished = [p for p in run.positions if not self.done[p]]
                if unfinished:  # an internal invariant: a run ends once all its requests have
                    raise RuntimeError(
                        f"{run.replica.name} ended a run with {len(unfinished)} requests unfinished "
                        "(internal error)"
                    ) from None
                continue
            except ray.exceptions.RayTaskError:
                raise  # raised inside the replica: the error (its own type) ends the call
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.ObjectLostError,
                ray.exceptions.GetTimeoutError,
            ) as e:
                self._lose(run.replica, why_lost(e))
                continue
            run.deadline = monotonic() + self.replica_timeout_s
            if not run.started:
                run.started = True
                if self.on_placed is not None:
                    for p, engine_id in zip(run.positions, value):
                        self.on_placed(self.request_ids[p], run.replica, engine_id)
                continue
            for i, payload in value:
                out = self._accept(run.positions[i], payload, run.replica)
                if out is not None:
                    yield out

    def _accept(self, pos: int, payload, replica: Replica) -> tuple[int, object] | None:
        if self.done[pos]:
            return None
        if self.mode == "generate":
            self.done[pos] = True
            payload.index = pos
            payload.request_id = self.request_ids[pos]
            return pos, payload
        if payload is None:  # the request's last piece came before
            self.done[pos] = True
            return None
        piece = self._new_part(pos, payload, replica)
        return None if piece is None else (pos, piece)

    def _new_part(self, pos: int, piece: dict, replica: Replica) -> dict | None:
        """A stream piece (from `replica`) with what was already yielded cut off (after a rerun), or
        None if nothing is new. A rerun that makes other tokens than were yielded is an error."""
        sent = self.sent.setdefault((pos, piece["completion"]), _Sent())
        if sent.finished:
            return None
        tokens, text = piece["token_ids"], piece["text"]
        if sent.replay_tokens is not None:
            sent.replay_tokens += tokens
            sent.replay_text += text
            n, m = min(len(sent.replay_tokens), len(sent.tokens)), min(len(sent.replay_text), len(sent.text))
            if sent.replay_tokens[:n] != sent.tokens[:n] or sent.replay_text[:m] != sent.text[:m]:
                raise RuntimeError(self._diverged(pos, piece["completion"], sent, replica))
            if len(sent.replay_tokens) < len(sent.tokens) or len(sent.replay_text) < len(sent.text):
                if not piece["finished"]:
                    return None
            tokens, text = sent.replay_tokens[len(sent.tokens) :], sent.replay_text[len(sent.text) :]
            sent.replay_tokens, sent.replay_text = None, ""
        if not tokens and not text and not piece["finished"]:
            return None
        sent.tokens += tokens
        sent.text += text
        sent.finished = piece["finished"]
        return {**piece, "index": pos, "request_id": self.request_ids[pos], "token_ids": tokens, "text": text}

    def _diverged(self, pos: int, completion: int, sent: _Sent, replica: Replica) -> str:
        """What to say when a rerun's tokens differ from those already streamed."""
        n = min(len(sent.replay_tokens), len(sent.tokens))
        at = next((i for i in range(n) if sent.replay_tokens[i] != sent.tokens[i]), None)
        if at is not None:
            where = f"token {at} is {sent.replay_tokens[at]} in the rerun, {sent.tokens[at]} as streamed"
        else:
            where = "the same tokens decode to other text"
        return (
            f"request {self.request_ids[pos]!r} (prompt {pos}, completion {completion}) was run again on "
            f"{replica.name} after {sent.lost_on or 'its replica'} was lost, and the rerun produced "
            f"different tokens than the {len(sent.tokens)} already streamed ({where}). Its sampling is "
            "seeded or greedy, but GPU numerics depend on the batch a request runs in (reduction splits "
            "follow the batch size), so the same request can sample otherwise in another replica's batch; "
            "the stream ends here rather than join two different continuations"
        )

    # ---- losing a replica ----------------------------------------------------------------------

    def _lose(self, replica: Replica, reason: str) -> None:
        """Give up on `replica` (killed, so it cannot answer late) and send its unfinished requests of
        this call to the others; a RuntimeError naming it when none is left or a rerun cannot continue."""
        replica.lost = reason
        try:
            self.ray.kill(replica.actor, no_restart=True)
        except Exception:  # already dead
            pass
        lost_runs = [gen for gen, run in self.runs.items() if run.replica is replica]
        positions = sorted(p for gen in lost_runs for p in self.runs.pop(gen).positions if not self.done[p])
        if not positions:
            return
        survivors = [r for r in self.replicas if r.lost is None]
        if not survivors:
            raise RuntimeError(
                f"{replica.name} was lost ({reason}) with {len(positions)} unfinished requests, and no "
                "replica is left to run them"
            )
        if self.mode == "stream":
            for p in positions:
                begun = [s for (q, _), s in self.sent.items() if q == p]
                _, _, params = self.work[p]
                if begun and params.temperature != 0 and params.seed is None:
                    raise RuntimeError(
                        f"{replica.name} was lost ({reason}) while streaming prompt {p}, which samples "
                        "without a seed: a rerun would not continue the text already streamed (give "
                        "requests a seed, or the LLM one, to let them run again)"
                    )
                for sent in begun:
                    if not sent.finished:
                        sent.rerun_after(replica.name)
        logger.warning(
            "%s was lost (%s): running its %d unfinished requests on %s",
            replica.name,
            reason,
            len(positions),
            ", ".join(r.name for r in survivors),
        )
        self._send(positions, survivors)


def why_lost(error: Exception) -> str:
    """Ray's reason a replica is gone, in a line: its "... because ..." line when it gives one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    because = [line for line in lines if " because " in line]
    return (because or lines or [type(error).__name__])[-1]
