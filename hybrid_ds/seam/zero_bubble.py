"""ZB-H1 on DeepSpeed's PipelineEngine: each backward split into B (the stage input's gradient, which the previous
stage waits for) and W (the weight gradients, run later to fill the pipeline's bubble), for any stage's modules.

- The split (:func:`backward_input`, :func:`backward_weight`) is autograd's, as ``torch.distributed.pipelining``
  does it: B runs the backward to the stage's inputs only (``inputs=``), capturing the gradient that reaches each
  node where a weight's gradient path leaves the inputs' path; W starts from those nodes, one autograd call per
  group of weights that share nodes, so that nothing B computed is computed again. W's gradients reach the weights
  through their ``AccumulateGrad`` nodes, so ZeRO-2's and bf16's gradient hooks fire as in a whole backward.
- B runs DeepSpeed's own ``_exec_backward_pass`` (the loss's scaling by gradient accumulation, the optimizers'
  prologue and epilogue) with ``torch.Tensor.backward`` standing for B while it runs (:func:`input_gradients_only`);
  W then adds what DeepSpeed does around a backward's gradients (bf16: into the fp32 gradients; ZeRO-2: reduced
  into the partition).
- :class:`ProgramSchedule` runs a list of instructions (``hybrid_ds.config.schedule.instructions``) as a
  ``PipeSchedule``; :class:`BackwardInputPass` and :class:`WeightPass` are new instructions, added to an engine's own
  ``_INSTRUCTION_MAP`` (:func:`use_program`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe import p2p as ds_p2p
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from torch.autograd.graph import GradientEdge, Node

from hybrid_ds.seam.compat import code_has, require, requirement, undecorated

_WHY = "pipeline.schedule zb-h1 runs DeepSpeed's backward pass with torch.Tensor.backward standing for its first half"

BACKWARD_CALLS = requirement(
    "zero_bubble.backward_calls", "PipelineEngine._exec_backward_pass calling backward on its outputs, the last "
    "stage through DeepSpeedEngine.backward's loss.backward(**backward_kwargs), and _train_schedule",
    lambda: code_has(PipelineEngine._exec_backward_pass, "super().backward(self.loss)",
                     "outputs.backward(gradient=grad_tensors)")
    and code_has(undecorated(DeepSpeedEngine.backward), "loss.backward(**backward_kwargs)")
    and code_has(PipelineEngine.train_batch, "sched = self._train_schedule()", "self._exec_schedule(sched)")
    and callable(getattr(PipelineEngine, "_train_schedule", None)), _WHY)


SENDS = requirement(
    "zero_bubble.sends", "PipelineEngine's activation, gradient and shape sends going through "
    "deepspeed.runtime.pipe.p2p.send, which sends with torch.distributed.send",
    lambda: all(code_has(getattr(PipelineEngine, name), "p2p.send(...)")
                for name in ("_exec_send_activations", "_exec_send_grads", "_send_tensor_meta"))
    and code_has(ds_p2p.send, "dist.send(tensor, dest_rank)") and callable(getattr(ds_p2p, "can_send_recv", None)),
    "pipeline.schedule zb-h1 sends without waiting for the receiving stage")


def check_zero_bubble() -> None:
    """DeepSpeed 0.19.8's ``_exec_backward_pass`` runs the last stage's backward through ``DeepSpeedEngine.backward``
    (which calls ``loss.backward(**backward_kwargs)`` on the scaled loss) and the others' as
    ``outputs.backward(gradient=grad_tensors)``; ``train_batch`` runs the schedule ``_train_schedule()`` returns."""
    require(BACKWARD_CALLS, SENDS)


# ---------------------------------------------------------------- the split of one backward


def _grad_node(tensor: torch.Tensor) -> Node | None:
    """A tensor's ``grad_fn``, or a leaf's ``AccumulateGrad`` node."""
    if tensor.grad_fn is not None:
        return tensor.grad_fn
    if not tensor.requires_grad:
        return None
    return tensor.view_as(tensor).grad_fn.next_functions[0][0]


@dataclass(eq=False)
class _Group:
    """Weights whose gradients start at the same nodes, with the gradients B captured there."""
    params: list[torch.nn.Parameter]
    nodes: list[Node]
    grads: dict[Node, tuple] = field(default_factory=dict)


@dataclass
class PendingWeights:
    """What W needs of one micro-batch: the groups, or (a stage none of whose inputs needs a gradient) the whole
    backward to run."""
    groups: list[_Group] = field(default_factory=list)
    whole: tuple[torch.Tensor, Any] | None = None


def backward_input(output: torch.Tensor, gradient: Any, inputs: list[torch.Tensor],
                   params: list[torch.nn.Parameter]) -> PendingWeights:
    """B: ``output.backward(gradient)`` as far as ``inputs`` (their ``.grad``), keeping what W needs of it."""
    inputs = [t for t in inputs if t.requires_grad]
    root = output.grad_fn
    if not inputs or root is None:
        return PendingWeights(whole=(output, gradient))
    toward_output: dict[Node, list[Node]] = {root: []}  # node -> the nodes it feeds (reverse edges)
    queue = [root]
    while queue:
        node = queue.pop()
        for child, _ in node.next_functions:
            if child is not None:
                if child not in toward_output:
                    toward_output[child] = []
                    queue.append(child)
                toward_output[child].append(node)
    inputs_path = _reachable([_grad_node(t) for t in inputs], toward_output, stop=set())
    owner: dict[Node, _Group] = {}
    groups: list[_Group] = []
    for param in params:
        start = _grad_node(param) if param.requires_grad else None
        if start not in toward_output:
            continue  # no gradient from this micro-batch
        private = _reachable([start], toward_output, stop=inputs_path)
        nodes = [n for n in private if n in inputs_path]
        if not nodes:  # its path never meets the inputs' (possible only for a branch off the output): from the top
            nodes, private = [root], private | {root}
        met = {id(owner[n]): owner[n] for n in private if n in owner}
        group = _Group([param], nodes)
        for other in met.values():  # weights that share a node are one group: W runs each node once
            group.params += other.params
            group.nodes += [n for n in other.nodes if n not in group.nodes]
            groups.remove(other)
        groups.append(group)
        for node, held in list(owner.items()):
            if id(held) in met:
                owner[node] = group
        for node in private:
            owner[node] = group
    hooks = []
    for group in groups:
        for node in group.nodes:
            hooks.append(node.register_prehook(lambda grads, group=group, node=node: group.grads.__setitem__(node, grads)))
    try:
        torch.autograd.backward(output, gradient, retain_graph=True, inputs=inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return PendingWeights(groups=groups)


def _reachable(starts: list[Node | None], toward_output: dict[Node, list[Node]], stop: set[Node]) -> set[Node]:
    """The nodes reached from ``starts`` toward the output, not going past a node of ``stop`` (which is included)."""
    seen = {n for n in starts if n is not None}
    queue = list(seen)
    while queue:
        node = queue.pop()
        if node in stop:
            continue
        for parent in toward_output.get(node, ()):
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return seen


def backward_weight(pending: PendingWeights) -> None:
    """W: the weight gradients of one micro-batch, accumulated into ``.grad`` through autograd."""
    if pending.whole is not None:
        output, gradient = pending.whole
        _ORIGINAL_BACKWARD(output, gradient)
        return
    for group in pending.groups:
        edges, grads = [], []
        for node in group.nodes:
            for i, grad in enumerate(group.grads.get(node, ())):
                if grad is not None:
                    edges.append(GradientEdge(node, i))
                    grads.append(grad)
        if not edges:
            continue
        # Each node gets exactly the gradient B gave it: not a second one through another node of the group, and
        # not one changed again by a tensor hook on its output (DeepSpeed scales its outputs' gradients by 1/GAS in
        # a backward it did not start), which runs before a node's own pre-hooks.
        clamps = [node.register_prehook(lambda _, saved=group.grads[node]: saved)
                  for node in group.nodes if node in group.grads]
        try:
            torch.autograd.backward(edges, grads, inputs=group.params)
        finally:
            for clamp in clamps:
                clamp.remove()


_ORIGINAL_BACKWARD = torch.Tensor.backward


@contextlib.contextmanager
def input_gradients_only(inputs: list[torch.Tensor], params: list[torch.nn.Parameter],
                         pending: list[PendingWeights]) -> Iterator[None]:
    """While it is open, ``tensor.backward(gradient)`` runs B (appending what W needs to ``pending``)."""

    def first_half(tensor: torch.Tensor, gradient: Any = None, *_: Any, **__: Any) -> None:
        # DeepSpeed receives every micro-batch's gradient into one buffer (grad_layer): W needs this one's
        gradient = gradient.clone() if torch.is_tensor(gradient) else gradient
        pending.append(backward_input(tensor, gradient, inputs, params))

    torch.Tensor.backward = first_half
    try:
        yield
    finally:
        torch.Tensor.backward = _ORIGINAL_BACKWARD


# ---------------------------------------------------------------- the schedule and its instructions


class BackwardInputPass(ds_schedule.BufferOpInstruction):
    """B of the micro-batch in ``buffer_id``: its input's gradient, for SendGrad."""

    def __init__(self, buffer_id: int, micro_batch: int):
        super().__init__(buffer_id, micro_batch=micro_batch)


class WeightPass(ds_schedule.PipeInstruction):
    """W of ``micro_batch``: its weight gradients."""

    def __init__(self, micro_batch: int):
        super().__init__(micro_batch=micro_batch)


class WeightPassesDone(ds_schedule.PipeInstruction):
    """Before the step's reductions: every micro-batch's W ran (a W skipped would leave its gradients out)."""


class ProgramSchedule(ds_schedule.PipeSchedule):
    """A stage's instructions, one per step, then the step's reductions and the optimizer step.

    ``program`` is a list of (kind, micro-batch), kinds as ``hybrid_ds.config.schedule.Instruction``'s;
    micro-batch k uses buffer k mod ``buffers``."""

    def __init__(self, program: list[tuple[str, int]], buffers: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.program, self.buffers = program, buffers

    def steps(self) -> Iterator[list[Any]]:
        make: dict[str, Callable[[int], Any]] = {
            "load": lambda k: ds_schedule.LoadMicroBatch(k % self.buffers),
            "recv_act": lambda k: ds_schedule.RecvActivation(k % self.buffers),
            "forward": lambda k: ds_schedule.ForwardPass(k % self.buffers),
            "send_act": lambda k: ds_schedule.SendActivation(k % self.buffers),
            "recv_grad": lambda k: ds_schedule.RecvGrad(k % self.buffers),
            "backward": lambda k: ds_schedule.BackwardPass(k % self.buffers),
            "backward_input": lambda k: BackwardInputPass(k % self.buffers, k),
            "weight": lambda k: WeightPass(k),
            "send_grad": lambda k: ds_schedule.SendGrad(k % self.buffers),
        }
        for kind, micro_batch in self.program:
            yield [make[kind](micro_batch)]
        yield [WeightPassesDone(), ds_schedule.ReduceTiedGrads(), ds_schedule.ReduceGrads(),
               ds_schedule.OptimizerStep()]

    def num_pipe_buffers(self) -> int:
        return self.buffers


def use_program(engine: Any, program: list[tuple[str, int]], buffers: int,
                around_input_pass: Callable[[], Any] = contextlib.nullcontext) -> None:
    """Make ``engine`` (a PipelineEngine) train each batch by ``program`` instead of DeepSpeed's 1F1B.

    ``around_input_pass``: a context manager B runs inside (the fused head loss keeps its weight's gradient for W).
    """
    check_zero_bubble()
    engine._zb_program, engine._zb_pending, engine._zb_sends = program, {}, []
    engine._zb_around_input_pass = around_input_pass
    params = [p for p in engine.module.parameters() if p.requires_grad]

    def train_schedule() -> ProgramSchedule:
        return ProgramSchedule(engine._zb_program, buffers, micro_batches=engine.micro_batches,
                               stages=engine.num_stages, stage_id=engine.stage_id)

    def exec_backward_input(self: Any, buffer_id: int, micro_batch: int) -> None:
        inputs = self.pipe_buffers["inputs"][buffer_id]
        inputs = [t for t in (inputs if isinstance(inputs, tuple) else (inputs,))
                  if torch.is_tensor(t) and t.is_floating_point()]
        pending: list[PendingWeights] = []
        with self._zb_around_input_pass(), input_gradients_only(inputs, params, pending):
            self._exec_backward_pass(buffer_id)
        assert len(pending) == 1, f"one backward call per micro-batch, got {len(pending)}"
        self._zb_pending[micro_batch] = pending[0]

    def exec_weight(self: Any, micro_batch: int) -> None:
        if micro_batch not in self._zb_pending:
            raise RuntimeError(f"pipeline schedule: W of micro-batch {micro_batch} without its B (stage "
                               f"{self.stage_id}; B pending for {sorted(self._zb_pending)})")
        pending = self._zb_pending.pop(micro_batch)
        bf16 = self.using_bf16_optimizer
        if bf16:
            self.optimizer.clear_lp_grads()
        self._running_engine_backward = True
        try:
            backward_weight(pending)
        finally:
            self._running_engine_backward = False
        if bf16 and not self._config.bfloat16_config.immediate_grad_update:
            self.optimizer.update_hp_grads(clear_lp_grads=False)
        reduce_bucketed = getattr(self, "_reduce_bucketed", None)  # ZeRO-2 with stages
        if reduce_bucketed is not None:
            reduce_bucketed()

    def weights_done(self: Any) -> None:
        for work, _ in self._zb_sends:
            work.wait()
        self._zb_sends = []
        if self._zb_pending:
            raise RuntimeError(f"pipeline schedule: W of micro-batches {sorted(self._zb_pending)} never ran (stage "
                               f"{self.stage_id}): their weight gradients would be missing from the step")

    engine._train_schedule = train_schedule
    sending = engine._INSTRUCTION_MAP
    engine._INSTRUCTION_MAP = {**sending, BackwardInputPass: exec_backward_input, WeightPass: exec_weight,
                               WeightPassesDone: weights_done}
    if ds_p2p.can_send_recv():
        for kind in (ds_schedule.SendActivation, ds_schedule.SendGrad):
            engine._INSTRUCTION_MAP[kind] = _without_waiting(sending[kind])


def _without_waiting(send: Callable[..., None]) -> Callable[..., None]:
    """``send`` (DeepSpeed's SendActivation or SendGrad) with ``torch.distributed.isend`` for DeepSpeed's blocking
    ``p2p.send``: the stage goes on to its next pass (a W, which 1F1B has not) instead of waiting until the
    neighbour reaches the matching receive. The neighbour receives in the same order (messages between two ranks
    match in order), each sent tensor is kept until its send completes, and the step waits for all of them before
    its reductions (:class:`WeightPassesDone`)."""

    def run(self: Any, buffer_id: int) -> None:
        self._zb_sends = [(work, tensor) for work, tensor in self._zb_sends if not work.is_completed()]

        def isend(tensor: torch.Tensor, dest_stage: int, async_op: bool = False) -> None:
            work = torch.distributed.isend(tensor, self.grid.stage_to_global(stage_id=dest_stage))
            self._zb_sends.append((work, tensor))

        blocking, ds_p2p.send = ds_p2p.send, isend
        try:
            send(self, buffer_id)
        finally:
            ds_p2p.send = blocking

    return run
