"""Two nodes train, resume exactly and export, and refuse a save_dir they do not share, on every rank.

The nodes are two launchers of one process each on this machine, started as a user starts them on two hosts
without ssh:

    deepspeed --hostfile HOSTFILE --no_ssh --node_rank R --master_addr 127.0.0.1 --master_port P \\
        launch/train.py --config CONFIG

for R = 0 and 1, HOSTFILE naming two hosts of one slot each. Everything stays on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import warm_ranks

from hybrid_ds.config import DataConfig
from hybrid_ds.data import load_data, sources
from test_train_multiproc import LAUNCHER, ROOT, checkpoint_logits, summary, tiny_config, train

multiproc = pytest.mark.multiproc


def node_command(hostfile: Path, node_rank: int, port: int, config: Path, *extra: str) -> list[str]:
    return [str(LAUNCHER), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "launch" / "train.py"),
            "--config", str(config), *extra]


def two_nodes(config: Path, *extra: str, node1: tuple[str, ...] = (), expect: int = 0) -> list[str]:
    """Both nodes' launchers at once (``node1``: arguments only node 1 gets); each node's output."""
    hostfile = config.parent / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    port, logs, procs = warm_ranks.free_port(), [config.parent / f"node{r}.log" for r in (0, 1)], []
    try:
        for rank, log in enumerate(logs):
            with log.open("w") as out:  # files, not pipes: a full pipe would stall a node
                procs.append(subprocess.Popen(node_command(hostfile, rank, port, config, *extra,
                                                           *(node1 if rank else ())),
                                              stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                              start_new_session=True))
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        for proc in procs:  # a node left running after a failure: end its launcher and ranks
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    outputs = [log.read_text() for log in logs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == expect, f"node {rank} exited {proc.returncode}:\n{output[-4000:]}"
    return outputs


def with_data(config: Path, **data) -> Path:
    raw = json.loads(config.read_text())
    raw["data"].update(data)
    config.write_text(json.dumps(raw))
    return config


@multiproc
@pytest.mark.parametrize("stages", [2, 1])
def test_two_nodes_train_resume_exactly_and_export(tmp_path, stages):
    """pp=2 (a stage per node) and dp=2 (a replica per node): 3 steps, then --resume to 6, give exactly the losses of
    one uninterrupted 6-step run of 2 processes on one node (dropout on); the run's export computes exactly its
    checkpoint's pipeline logits. Both nodes start with an empty data.cache_dir and pack it at once."""
    import transformers

    for folder in ("nodes", "one"):
        (tmp_path / folder).mkdir()
    cache, hf = tmp_path / "cache", tmp_path / "hf"
    steps = dict(save_interval=3, eval_interval=0)
    first = with_data(tiny_config(tmp_path / "nodes", "gpt2-tiny", stages, max_steps=3, **steps), cache_dir=str(cache))
    two_nodes(first)
    losses = summary(first)["losses"]
    assert [p.name.startswith(".") for p in cache.iterdir()] == [False]  # one packed entry, no half-written one
    resumed = with_data(tiny_config(tmp_path / "nodes", "gpt2-tiny", stages, max_steps=6, export_hf=str(hf), **steps),
                        cache_dir=str(cache))
    two_nodes(resumed, "--resume")
    assert summary(resumed)["losses"][:3] == losses  # the summary covers the whole run
    losses = summary(resumed)["losses"]
    straight = tiny_config(tmp_path / "one", "gpt2-tiny", stages, max_steps=6, **steps)
    train(straight)
    want = summary(straight)["losses"]
    assert losses == want and want[-1] < want[0] - 0.1, (want, losses)  # exactly: the same floats

    batch = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    pipeline = checkpoint_logits(resumed, batch, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        assert (model(input_ids=batch).logits - pipeline).abs().max().item() == 0.0


@multiproc
def test_a_save_dir_not_shared_by_the_nodes_is_refused_on_every_rank(tmp_path):
    """Node 1 sees another folder at train.save_dir (as on a node-local disk): both nodes print the same one line
    and exit 2 before packing or building anything, and no checkpoint is written anywhere."""
    config = tiny_config(tmp_path, "gpt2-tiny", 2, max_steps=2)
    other = tmp_path / "node-local"
    outputs = two_nodes(config, node1=("--set", f"train.save_dir={other}"), expect=2)
    for output in outputs:
        errors = [line for line in output.splitlines() if "hybrid-ds: error" in line]
        assert len(errors) == 1 and errors[0].startswith("hybrid-ds: error: train.save_dir: "), output[-3000:]
        assert f"{tmp_path / 'run'} is not one folder shared by every node: rank 1" in errors[0], errors[0]
        assert "Traceback" not in output and "tokenize" not in output, output[-3000:]
    assert list((tmp_path / "run").iterdir()) == [] and not other.exists()


@multiproc
def test_a_save_dir_rank_0_cannot_create_is_one_line_on_every_rank(tmp_path):
    """The same check meets a save_dir rank 0 cannot create (here: below a file) before anything is built: one line,
    exit 2, where rank 0 used to die with an OSError traceback and the other rank with gloo's."""
    (tmp_path / "a-file").write_text("")
    config = tiny_config(tmp_path, "gpt2-tiny", 2, max_steps=2, save_dir=str(tmp_path / "a-file" / "run"))
    proc = train(config, expect=2)
    # One line, or under heavy load the same line twice: cli.report_error's second rank prints when the launcher
    # has not ended it within 3 s of the first rank's line.
    errors = {line for line in proc.stderr.splitlines() if "hybrid-ds: error" in line}
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "train.save_dir: " in min(errors) and "cannot be written on rank 0 (" in min(errors) \
        and "Not a directory" in min(errors), errors
    assert "Traceback" not in proc.stdout + proc.stderr

def test_a_second_packer_of_the_same_cache_reads_the_first_ones(tmp_path, monkeypatch):
    """Two nodes that share data.cache_dir pack at once. The one that finishes second must neither fail nor replace
    the folder the first one wrote (which that one is already reading): it reads that folder."""
    (tmp_path / "corpus.txt").write_text("\n".join(f"Document {i} tells of {i} apples and pears." for i in range(60)))
    cfg = DataConfig(source=str(tmp_path / "corpus.txt"), seq_len=16, cache_dir=str(tmp_path / "cache"))
    real_load_documents, other = sources.load_documents, {}

    def load_documents_while_the_other_node_finishes(data):
        if not other:  # the other node packs and writes the cache while this one reads its documents
            monkeypatch.setattr(sources, "load_documents", real_load_documents)
            other["data"] = load_data(cfg, "causal_lm")
            other["files"] = {p: p.stat().st_ino for p in (tmp_path / "cache").rglob("*")}
        return real_load_documents(data)

    monkeypatch.setattr(sources, "load_documents", load_documents_while_the_other_node_finishes)
    mine = load_data(cfg, "causal_lm")
    assert other and mine.train["input_ids"] == other["data"].train["input_ids"]
    assert mine.eval["input_ids"] == other["data"].eval["input_ids"]
    assert {p: p.stat().st_ino for p in (tmp_path / "cache").rglob("*")} == other["files"]  # untouched, no leftovers
