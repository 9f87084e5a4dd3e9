"""Pipeline schedules: the order of each stage's passes, a simulator of their timing, and the instructions a stage
runs (passes and the transfers between neighbouring stages, in an order both neighbours share). Pure: no torch.

- ``"1f1b"``: DeepSpeed's ``TrainSchedule``. Stage s of p runs min(p-s-1, m) warm-up forwards, then a forward and
  a whole backward in turn, then the remaining backwards: each stage idles (p-1)(F+B+W) of a step.
- ``"zb-h1"``: ZB-H1 of Qi et al., "Zero Bubble Pipeline Parallelism" (arXiv 2401.10241). The backward is split into
  B (the input gradient, which the previous stage waits for) and W (the weight gradient, which nothing waits for).
  Stage s runs min(p-s-1, m) warm-up forwards, then s rounds of a forward and a B (their W put off), then F, B, W in
  turn, then B and W, then the W still owed: each stage idles (p-1)(F+B-W), a third of 1F1B's when F = B = W, and
  holds at most p micro-batches between forward and W (1F1B's first stage holds p as well, its stage s p-s).

>>> [" ".join(f"{p.kind}{p.micro_batch}" for p in passes("zb-h1", 2, 4, s)) for s in (0, 1)]
['F0 F1 B0 W0 F2 B1 W1 F3 B2 W2 B3 W3', 'F0 B0 F1 B1 W0 F2 B2 W1 F3 B3 W2 W3']
>>> [round(simulate(name, 4, 8).idle(0), 3) for name in SCHEDULES]  # F = B = W: (p-1)/(m+p-1) and a third of it
[0.273, 0.111]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid_ds.config.topology import bubble_fraction

SCHEDULES = ("1f1b", "zb-h1")
UNIT = {"F": 1.0, "B": 1.0, "W": 1.0}


@dataclass(frozen=True)
class Pass:
    kind: str          # "F" forward, "B" input gradient, "W" weight gradient, "BW" the whole backward (1F1B)
    micro_batch: int


def passes(schedule: str, stages: int, micro_batches: int, stage: int) -> list[Pass]:
    """Stage ``stage``'s passes in the order it runs them."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
    m, order = micro_batches, []
    f = b = w = 0

    def run(kind: str, k: int) -> int:
        order.append(Pass(kind, k))
        return k + 1

    for _ in range(min(stages - stage - 1, m)):
        f = run("F", f)
    if schedule == "1f1b":
        while f < m:
            f, b = run("F", f), run("BW", b)
        while b < m:
            b = run("BW", b)
        return order
    for _ in range(stage):  # the W of these micro-batches fills the end of the step
        if f < m:
            f = run("F", f)
        if b < f:
            b = run("B", b)
    while f < m:
        f, b, w = run("F", f), run("B", b), run("W", w)
    while b < m:
        b, w = run("B", b), run("W", w)
    while w < m:
        w = run("W", w)
    return order


def _costs(schedule: str, costs: dict[str, float]) -> dict[str, float]:
    return {**costs, "BW": costs["B"] + costs["W"]} if schedule == "1f1b" else dict(costs)


@dataclass
class Timeline:
    """When each pass of a simulated step starts and ends, in the unit of the costs."""
    stages: int
    start: dict[tuple[int, Pass], float] = field(default_factory=dict)
    end: dict[tuple[int, Pass], float] = field(default_factory=dict)

    @property
    def step(self) -> float:
        return max(self.end.values())

    def busy(self, stage: int) -> float:
        return sum(self.end[key] - self.start[key] for key in self.end if key[0] == stage)

    def idle(self, stage: int) -> float:
        """The fraction of the step ``stage`` spends waiting."""
        return 1 - self.busy(stage) / self.step


def _dependency(pass_: Pass, stage: int, stages: int) -> tuple[int, Pass] | None:
    """The pass (stage, pass) whose result ``pass_`` on ``stage`` needs: the activation from the stage before, the
    gradient from the stage after (the last stage: its own forward), and for W its own B."""
    k = pass_.micro_batch
    if pass_.kind == "F":
        return (stage - 1, Pass("F", k)) if stage > 0 else None
    if pass_.kind == "W":
        return stage, Pass("B", k)
    if stage == stages - 1:
        return stage, Pass("F", k)
    return stage + 1, Pass(pass_.kind, k)


def simulate(schedule: str, stages: int, micro_batches: int, costs: list[dict[str, float]] | dict[str, float] = UNIT,
             transfer: float = 0.0) -> Timeline:
    """Each stage runs its passes in order, each as soon as the stage is free and what it needs has arrived;
    ``costs`` are the F, B and W durations (one dict, or one per stage; 1F1B's whole backward costs B + W) and
    ``transfer`` the time an activation or gradient takes to reach the neighbouring stage."""
    per_stage = [_costs(schedule, c) for c in (costs if isinstance(costs, list) else [costs] * stages)]
    orders = [passes(schedule, stages, micro_batches, s) for s in range(stages)]
    timeline, position, free = Timeline(stages), [0] * stages, [0.0] * stages
    moved = True
    while moved:
        moved = False
        for s in range(stages):
            while position[s] < len(orders[s]):
                pass_ = orders[s][position[s]]
                need = _dependency(pass_, s, stages)
                if need is not None and need not in timeline.end:
                    break
                ready = 0.0 if need is None else timeline.end[need] + (transfer if need[0] != s else 0.0)
                start = max(free[s], ready)
                timeline.start[s, pass_], timeline.end[s, pass_] = start, start + per_stage[s][pass_.kind]
                free[s], position[s], moved = start + per_stage[s][pass_.kind], position[s] + 1, True
    assert all(position[s] == len(orders[s]) for s in range(stages)), "the schedule waits on itself"
    return timeline


def bubble(schedule: str, stages: int, micro_batches: int) -> float:
    """The fraction of a step each stage idles with F = B = W (a backward costs twice a forward, split evenly):
    1F1B's (p-1)/(m+p-1), ZB-H1's (p-1)/(3m+p-1) once m >= p (the simulation below that).

    >>> round(bubble("1f1b", 4, 8), 3), round(bubble("zb-h1", 4, 8), 3), bubble("zb-h1", 1, 8)
    (0.273, 0.111, 0.0)
    """
    p, m = stages, micro_batches
    if schedule == "1f1b" or p == 1:
        return bubble_fraction(p, m)
    return (p - 1) / (3 * m + p - 1) if m >= p else simulate(schedule, p, m).idle(0)


def in_flight(schedule: str, stages: int, micro_batches: int, stage: int) -> int:
    """The most micro-batches whose activations ``stage`` holds at once: from a forward to the backward that frees
    them (1F1B: p - stage; ZB-H1: until W, p on every stage).

    >>> [in_flight("1f1b", 4, 8, s) for s in range(4)], [in_flight("zb-h1", 4, 8, s) for s in range(4)]
    ([4, 3, 2, 1], [4, 4, 4, 4])
    """
    return min(stages - stage if schedule == "1f1b" else stages, micro_batches)


def weights_pending(schedule: str, stages: int, micro_batches: int, stage: int) -> int:
    """Of the micro-batches ``stage`` holds when it holds the most (:func:`in_flight`), those past their B and
    waiting for their W: each keeps, besides its activations, the gradients B left where the weights' paths leave
    the input's (ZB-H1; 0 under 1F1B, whose backward is whole).

    >>> [weights_pending("zb-h1", 4, 8, s) for s in range(4)], weights_pending("1f1b", 4, 8, 3)
    ([1, 2, 3, 4], 0)
    """
    held = pending = 0
    most = (0, 0)
    for pass_ in passes(schedule, stages, micro_batches, stage):
        held += {"F": 1, "W": -1, "BW": -1}.get(pass_.kind, 0)
        pending += {"B": 1, "W": -1}.get(pass_.kind, 0)
        most = max(most, (held, pending))
    return most[1]


# ---------------------------------------------------------------- what a stage runs


@dataclass(frozen=True)
class Instruction:
    kind: str          # load, recv_act, forward, send_act, recv_grad, backward_input, weight, backward, send_grad
    micro_batch: int


def instructions(schedule: str, stages: int, micro_batches: int, stage: int) -> list[Instruction]:
    """Stage ``stage``'s passes with its transfers, for a runtime whose sends and receives block until the
    neighbour's matching one runs.

    Each transfer sits at the time the unit-cost simulation makes it (the end of the pass that produces it), and
    each stage runs its transfers in the order of those times, ties broken alike on every stage: so the two stages
    of a link post their sends and receives in the same order, and every stage's order is part of one order of all
    of them, which no wait can break. A receive comes before the pass that needs it, a send after the pass that
    produced it.
    """
    timeline = simulate(schedule, stages, micro_batches)
    transfers = []  # (time, link, direction, micro-batch, kind on this stage)
    for (s, pass_), end in timeline.end.items():
        k = pass_.micro_batch
        if pass_.kind == "F" and s < stages - 1 and stage in (s, s + 1):
            transfers.append((end, s, 0, k, "send_act" if stage == s else "recv_act"))
        if pass_.kind in ("B", "BW") and s > 0 and stage in (s - 1, s):
            transfers.append((end, s - 1, 1, k, "send_grad" if stage == s else "recv_grad"))
    transfers.sort()
    backward = "backward" if schedule == "1f1b" else "backward_input"
    names = {"F": "forward", "B": backward, "BW": backward, "W": "weight"}
    out, sent = [], 0
    for pass_ in passes(schedule, stages, micro_batches, stage):
        begin = timeline.start[stage, pass_]
        while sent < len(transfers) and transfers[sent][0] <= begin:
            out.append(Instruction(transfers[sent][4], transfers[sent][3]))
            sent += 1
        if pass_.kind == "F" and stage in (0, stages - 1):
            out.append(Instruction("load", pass_.micro_batch))
        out.append(Instruction(names[pass_.kind], pass_.micro_batch))
    out += [Instruction(t[4], t[3]) for t in transfers[sent:]]
    return out


def buffers_needed(program: list[Instruction]) -> int:
    """The most micro-batches a stage holds at once, from its first instruction for one (a load or a receive of its
    activation) to its last (sending the input gradient, or the backward on the first stage)."""
    first, last = {}, {}
    for i, instruction in enumerate(program):
        if instruction.kind not in ("weight", "recv_grad"):
            first.setdefault(instruction.micro_batch, i)
            last[instruction.micro_batch] = i
    return max(sum(first[k] <= i <= last[k] for k in first) for i in range(len(program)))
