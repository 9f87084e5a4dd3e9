"""DeepSpeed's AutoEP (``expert_parallel``) trains a tiny Mixtral on the plain engine (2 gloo processes) with the
losses of the run without it, and its mistakes are one line on every rank.

AutoEP spreads each MoE layer's experts over ``autoep_size`` ranks and sends every token to the rank holding its
experts; it changes where experts compute, not what: the run's losses are the ones of the same run without it.
"""

from __future__ import annotations

import json

import pytest

from hybrid_ds.config import load_config_dict
from hybrid_ds.errors import UserError
from test_train_multiproc import summary, tiny_config, train

EP = {"enabled": True, "autoep_size": 2, "preset_model": "mixtral"}


def _config(tmp_path, ep: dict | None, stages: int = 1, zero: int = 2):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tiny_config(tmp_path, "mixtral-tiny", stages, zero=zero, max_steps=8, eval_interval=0)
    raw = json.loads(path.read_text())
    raw["scheduler"]["params"].update(warmup_num_steps=1, warmup_max_lr=5e-3)
    if ep:
        raw["expert_parallel"] = ep
    path.write_text(json.dumps(raw))
    return path


def _raw(**keys) -> dict:
    return {"model": {"name": "mixtral-tiny"}, "train_micro_batch_size_per_gpu": 1, **keys}


def test_expert_parallel_trains_the_plain_model_at_one_stage():
    cfg = load_config_dict(_raw(expert_parallel=EP, zero_optimization={"stage": 1}))
    assert cfg.expert_parallel and not cfg.pipeline_engine   # AutoEP replaces layers of the whole HF model
    assert load_config_dict(_raw(zero_optimization={"stage": 1})).pipeline_engine


@pytest.mark.parametrize("keys, key, says", [
    (dict(expert_parallel=EP, pipeline={"stages": 2}), "expert_parallel.enabled", "true needs pipeline.stages 1, got 2"),
    (dict(expert_parallel={**EP, "autoep_size": 0}), "expert_parallel.autoep_size", "must be a positive integer"),
    (dict(expert_parallel={**EP, "enabled": "yes"}), "expert_parallel.enabled", "must be true or false"),
    (dict(expert_parallel=EP, train={"export_hf": "/tmp/x", "save_dir": "/tmp/y"}), "train.export_hf", "each rank saves"),
])
def test_expert_parallel_mistakes_are_one_line(keys, key, says):
    with pytest.raises(UserError) as err:
        load_config_dict(_raw(**keys))
    assert err.value.key == key and says in err.value.message and "\n" not in err.value.message


@pytest.mark.multiproc
def test_expert_parallel_run_has_the_losses_of_the_run_without_it(tmp_path):
    """ep=2 over 2 ranks (each holds 2 of the 4 experts of every layer) against the same run with every expert on
    every rank: loss at step 1 within 1e-5 (measured: equal to the printed digits), and the loss falls."""
    with_ep, without = _config(tmp_path / "ep", EP), _config(tmp_path / "dense", None)
    train(with_ep)
    saved = sorted(p.name for p in (tmp_path / "ep" / "run" / "step_8").rglob("*.pt"))
    # DeepSpeed saves AutoEP's experts apart, one file per expert, written by the rank holding it
    assert sum("expert" in name for name in saved) == 2 * 4, saved
    train(without)
    ep, plain = summary(with_ep)["losses"], summary(without)["losses"]
    assert ep[0] == pytest.approx(plain[0], abs=1e-5), (ep, plain)
    assert ep[-1] < ep[0] - 0.1, ep
    assert ep == pytest.approx(plain, abs=1e-3), (ep, plain)


@pytest.mark.multiproc
def test_expert_parallel_with_stages_is_refused_on_every_rank(tmp_path):
    """Exit 2 before any process group: every rank meets it when reading the config (one line per node,
    hybrid_ds.cli.report_error)."""
    proc = train(_config(tmp_path, EP, stages=2, zero=1), expect=2)
    line = "hybrid-ds: error: expert_parallel.enabled: true needs pipeline.stages 1, got 2"
    assert (proc.stdout + proc.stderr).count(line) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
