"""Pipeline schedules (hybrid_ds.config.schedule): what each stage runs, checked by an independent model of blocking
sends and receives; the bubble of 1F1B and ZB-H1; and the split of one backward into B and W
(hybrid_ds.seam.zero_bubble) against the whole backward, bit for bit."""

from __future__ import annotations

import pytest
import torch

from hybrid_ds.config import load_config_dict
from hybrid_ds.config.schedule import SCHEDULES, Instruction, buffers_needed, instructions, passes, simulate
from hybrid_ds.config.topology import bubble_fraction
from hybrid_ds.errors import UserError

TRANSFERS = {"send_act": "recv_act", "recv_act": "send_act", "send_grad": "recv_grad", "recv_grad": "send_grad"}
LAYOUTS = [(p, m) for p in range(1, 9) for m in range(1, 17)]


def runs_to_the_end(programs: list[list[Instruction]]) -> bool:
    """Run the stages' programs where a send and its receive happen together (each waits for the other, as DeepSpeed's
    p2p does) and anything else at once; False if every stage waits."""
    at = [0] * len(programs)
    while True:
        moved = False
        for stage, program in enumerate(programs):
            while at[stage] < len(program) and program[at[stage]].kind not in TRANSFERS:
                at[stage], moved = at[stage] + 1, True
            if at[stage] == len(program):
                continue
            mine = program[at[stage]]
            peer = stage + 1 if mine.kind in ("send_act", "recv_grad") else stage - 1
            theirs = programs[peer][at[peer]] if at[peer] < len(programs[peer]) else None
            if theirs == Instruction(TRANSFERS[mine.kind], mine.micro_batch):
                at[stage], at[peer], moved = at[stage] + 1, at[peer] + 1, True
        if all(at[s] == len(p) for s, p in enumerate(programs)):
            return True
        if not moved:
            return False


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_layout_runs_without_waiting_on_itself(schedule):
    for p, m in LAYOUTS:
        programs = [instructions(schedule, p, m, s) for s in range(p)]
        assert runs_to_the_end(programs), (schedule, p, m)
        for stage, program in enumerate(programs):
            done = [i.kind for i in program]
            assert done.count("forward") == m and done.count("load") == m * (stage in (0, p - 1)), (p, m, stage)
            kinds = ("backward",) if schedule == "1f1b" else ("backward_input", "weight")
            assert all(done.count(kind) == m for kind in kinds), (p, m, stage)


def test_the_check_catches_transfers_out_of_order():
    programs = [instructions("zb-h1", 2, 4, s) for s in range(2)]
    first = [i for i, ins in enumerate(programs[1]) if ins.kind == "send_grad"][0]
    recv = [i for i, ins in enumerate(programs[1]) if ins.kind == "recv_act" and i > first][0]
    programs[1][first], programs[1][recv] = programs[1][recv], programs[1][first]
    assert not runs_to_the_end(programs)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_stage_holds_what_it_needs_until_it_is_done(schedule):
    """DeepSpeed keeps one received gradient (grad_layer): the next arrives after the backward that uses it; micro-batch
    k and k + buffers never hold the same buffer at once; a receive comes before the pass that needs it."""
    for p, m in LAYOUTS:
        for stage in range(p):
            program = instructions(schedule, p, m, stage)
            buffers = max(2, buffers_needed(program))
            first, last, waiting = {}, {}, None
            for i, ins in enumerate(program):
                if ins.kind == "recv_grad":
                    assert waiting is None, (p, m, stage, i)
                    waiting = ins.micro_batch
                if ins.kind in ("backward", "backward_input") and stage < p - 1:
                    assert waiting == ins.micro_batch, (p, m, stage, i)
                    waiting = None
                if ins.kind == "forward" and stage > 0:
                    assert Instruction("recv_act", ins.micro_batch) in program[:i]
                if ins.kind not in ("weight", "recv_grad"):
                    first.setdefault(ins.micro_batch, i)
                    last[ins.micro_batch] = i
            assert all(first[k + buffers] > last[k] for k in first if k + buffers in first), (p, m, stage)


def test_1f1b_idles_as_its_formula_and_zb_h1_a_third_of_it():
    for p, m in LAYOUTS:
        if p > 1 and m >= p:
            one = simulate("1f1b", p, m)
            assert one.step == 3 * (m + p - 1) and one.idle(0) == pytest.approx(bubble_fraction(p, m))
            # F = B = W: ZB-H1 idles (p-1)(F+B-W), a third of 1F1B's (p-1)(F+B+W)
            assert simulate("zb-h1", p, m).step == 3 * m + p - 1, (p, m)


def test_zb_h1_holds_at_most_as_many_micro_batches_as_1f1b_does_on_its_first_stage():
    """Between a micro-batch's forward and the pass that frees it (1F1B: its backward; ZB-H1: its W)."""
    for p, m in LAYOUTS:
        def held(schedule, stage, frees):
            count = most = 0
            for pass_ in passes(schedule, p, m, stage):
                count += (pass_.kind == "F") - (pass_.kind == frees)
                most = max(most, count)
            return most
        assert max(held("zb-h1", s, "W") for s in range(p)) == held("1f1b", 0, "BW") == min(p, m), (p, m)


def test_the_simulator_follows_the_slowest_stage_and_transfers():
    costs = [{"F": 1.0, "B": 1.0, "W": 1.0}, {"F": 2.0, "B": 2.0, "W": 2.0}]
    slow = simulate("1f1b", 2, 8, costs)
    assert slow.step == pytest.approx(8 * 6 + 3)  # the second stage's 8 passes, after the first stage's first F
    assert simulate("1f1b", 2, 1, transfer=0.5).step == pytest.approx(6 + 2 * 0.5)  # there and back once
    assert simulate("1f1b", 2, 8, transfer=0.5).step > simulate("1f1b", 2, 8).step


@pytest.mark.parametrize("change, key", [({"pipeline": {"stages": 1}}, "pipeline.schedule"),
                                         ({"pipeline": {"stages": 2, "activation_checkpoint_interval": 1}},
                                          "pipeline.schedule"),
                                         ({"train": {"compile": True}}, "pipeline.schedule"),
                                         ({"pipeline": {"stages": 2, "schedule": "zb"}}, "pipeline.schedule")])
def test_what_zb_h1_cannot_run_with_is_one_line(change, key):
    raw = {"model": {"name": "gpt2-tiny"}, "pipeline": {"stages": 2, "schedule": "zb-h1"}}
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(UserError) as err:
        load_config_dict(raw)
    assert err.value.key == key, err.value


# ---------------------------------------------------------------- B and W against the whole backward


def stage_model(name: str) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    from hybrid_ds.config import ModelConfig
    from hybrid_ds.models.resolve import auto_class, resolve_model

    resolved = resolve_model(ModelConfig(name=name, overrides={"resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                                                "attn_pdrop": 0.0} if name == "gpt2-tiny" else {}))
    torch.manual_seed(0)
    model = auto_class(resolved.family).from_config(resolved.hf_config).eval()
    inner = model.transformer if name == "gpt2-tiny" else model.model
    blocks = list(inner.h if name == "gpt2-tiny" else inner.layers)
    return model, blocks


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_b_then_w_is_the_whole_backward_bit_for_bit(name):
    """A middle stage (the model's blocks, hidden states in and out) over 3 micro-batches whose B and W interleave as
    ZB-H1's do: the input gradients after B and the accumulated weight gradients after W equal the whole backward's;
    B leaves every weight without a gradient; each weight's gradient hook fires once per micro-batch."""
    from hybrid_ds.seam.zero_bubble import backward_input, backward_weight

    model, blocks = stage_model(name)
    params = [p for b in blocks for p in b.parameters()]
    fired = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: fired.append(p))
    generator = torch.Generator().manual_seed(1)
    hidden = [torch.randn(2, 8, model.config.hidden_size, generator=generator) for _ in range(3)]
    seeds = [torch.randn(2, 8, model.config.hidden_size, generator=generator) for _ in range(3)]
    position = torch.arange(8)[None].expand(2, 8)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)

    def forward(k):
        x = hidden[k].clone().requires_grad_()
        h = x
        kwargs = {"position_embeddings": rotary(h, position)} if rotary is not None else {}
        for block in blocks:
            out = block(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return x, h

    whole_inputs = []
    for k in range(3):
        x, out = forward(k)
        out.backward(seeds[k])
        whole_inputs.append(x.grad)
    whole = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    fired.clear()
    pending, inputs = {}, {}
    for kind, k in [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("W", 0), ("B", 2), ("W", 1), ("W", 2)]:
        if kind == "F":
            inputs[k] = forward(k)
        elif kind == "B":
            x, out = inputs[k]
            pending[k] = backward_input(out, seeds[k], [x], params)
            assert torch.equal(x.grad, whole_inputs[k]) and (k > 0 or all(p.grad is None for p in params))
        else:
            backward_weight(pending.pop(k))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, whole))
    assert len(fired) == 3 * len(params) and {id(p) for p in fired} == {id(p) for p in params}


def test_a_skipped_w_shows():
    """The negative control of the test above: without micro-batch 1's W the gradients differ."""
    from hybrid_ds.seam.zero_bubble import backward_input, backward_weight

    _, blocks = stage_model("gpt2-tiny")
    params = [p for b in blocks for p in b.parameters()]
    totals = []
    for skip in (None, 1):
        for p in params:
            p.grad = None
        for k in range(2):
            x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(k), requires_grad=True)
            out = blocks[1](blocks[0](x)[0] if isinstance(blocks[0](x), tuple) else blocks[0](x))
            out = out[0] if isinstance(out, tuple) else out
            pending = backward_input(out, torch.ones_like(out), [x], params)
            if k != skip:
                backward_weight(pending)
        totals.append([p.grad.clone() for p in params])
    assert not all(torch.equal(a, b) for a, b in zip(*totals))
