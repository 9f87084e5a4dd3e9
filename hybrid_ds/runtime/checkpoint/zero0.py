"""hybrid_ds's own checkpoint format for fp32 ZeRO-0 (torch's optimizer), which DeepSpeed 0.19.8's ``ds_to_universal``
and universal loader do not read (they read ZeRO-1/2 partitions): the parameter names saved with each checkpoint, its
universal form written into the same files DeepSpeed's tools write, loaded back, and each optimizer group's settings
restored by name. The DeepSpeed file format these files follow is checked in :mod:`hybrid_ds.seam.universal`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hybrid_ds.seam.universal import check_zero0_universal

OPTIMIZER_NAMES = "hybrid_ds_optimizer_param_names"  # a ZeRO-0 checkpoint's client state: names in optimizer order


def optimizer_param_names(engine: Any) -> dict[str, list[list[str]]]:
    """``client_state`` for ``save_checkpoint``: under torch's own optimizer (fp32 ZeRO-0), the engine's parameter
    names in the order of each group's ``params`` (a torch optimizer's state is keyed by that position), so the
    checkpoint can be converted to the universal form; nothing under DeepSpeed's optimizers."""
    engine = getattr(engine, "engine", engine)
    if not isinstance(engine.optimizer, torch.optim.Optimizer):
        return {}
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return {OPTIMIZER_NAMES: [[names[id(p)] for p in group["params"]] for group in engine.optimizer.param_groups]}


def zero0_to_universal(folder: Path, out: Path, weights: dict[str, torch.Tensor], names: dict[str, str]) -> None:
    """Write into ``out`` the universal form of the fp32 ZeRO-0 pipeline checkpoint ``folder``: the files
    DeepSpeed's ``ds_to_universal`` writes for ZeRO-1/2. ``weights``: Hugging Face name -> the saved weight;
    ``names``: the engine's parameter names -> Hugging Face names. A tied weight, held by two stages with the same
    weight and moments, is written once."""
    check_zero0_universal()
    zero = out / "zero"
    zero.mkdir(parents=True)
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    groups: dict[Any, dict] = {}
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=False)
        optimizer = state.get("optimizer")
        if not isinstance(optimizer, dict) or OPTIMIZER_NAMES not in state:
            raise ValueError(f"{file.name} holds no torch optimizer state named by hybrid_ds (saved by an older "
                             "hybrid_ds, or in bf16/fp16)")
        for group, group_names in zip(optimizer["param_groups"], state[OPTIMIZER_NAMES]):
            for index, name in zip(group["params"], group_names):
                param_dir = zero / names.get(name, name)
                if param_dir.is_dir():
                    continue
                param_dir.mkdir()
                moments = dict(optimizer["state"].get(index, {}))
                if "step" in moments:
                    torch.save(moments.pop("step"), param_dir / "step.pt")
                for key, value in {"fp32": weights[names.get(name, name)], **moments}.items():
                    torch.save({"param": value.float(), "cat_dim": 0}, param_dir / f"{key}.pt")
        for group in group_settings(optimizer["param_groups"]):  # every stage's groups, by name (stages differ)
            groups.setdefault(group.get("name"), group)
        version = state["ds_version"]
        state["optimizer"] = None  # the moments are under zero/ now
        torch.save(state, out / file.name)
    torch.save({"param_groups": list(groups.values()), "ds_version": version}, zero / "optimizer_state.pt")


def load_universal_zero0(engine: Any, folder: Path, names: dict[str, str]) -> tuple[str, dict]:
    """Load a universal folder into an engine stepping torch's optimizer (fp32 ZeRO-0): each parameter's weight
    and optimizer state from ``zero/<name>/``, the groups' hyperparameters, and the scheduler and step counters
    from a stage's model-states file (every stage saves the same), as DeepSpeed's ``_load_checkpoint`` restores."""
    check_zero0_universal()
    optimizer, zero = engine.optimizer, folder / "zero"
    settings = group_settings(optimizer.param_groups)
    own = {id(p): name for name, p in engine.module.named_parameters()}
    with torch.no_grad():
        for group in optimizer.param_groups:
            on_device = group.get("fused") or group.get("capturable")  # where torch's AdamW keeps its step
            for p in group["params"]:
                param_dir = zero / names.get(own[id(p)], own[id(p)])
                state = {f.stem: torch.load(f, weights_only=False)["param"].reshape(p.shape).to(p)
                         for f in param_dir.glob("*.pt") if f.stem != "step"}
                p.copy_(state.pop("fp32"))
                if (param_dir / "step.pt").is_file():
                    step = torch.load(param_dir / "step.pt", weights_only=False)
                    state["step"] = torch.as_tensor(step, dtype=torch.float32,
                                                    device=p.device if on_device else "cpu").clone()
                optimizer.state[p] = state
    restore_group_settings(optimizer, torch.load(zero / "optimizer_state.pt", weights_only=False), settings)
    model_states = sorted(folder.glob("mp_rank_*_model_states.pt"))[0]
    checkpoint = torch.load(model_states, map_location="cpu", weights_only=False)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    engine.global_steps = checkpoint["global_steps"]
    engine.global_samples = checkpoint.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = checkpoint["skipped_steps"]
    return str(model_states), {}


def group_settings(groups: list[dict]) -> list[dict]:
    """An optimizer's groups without their parameters: the hyperparameters (lr, betas, weight_decay, name ...)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in groups]


def restore_group_settings(optimizer: Any, saved: dict, own: list[dict]) -> None:
    """Give each of ``optimizer``'s groups the settings of the saved group of the same name (a universal
    folder's ``zero/optimizer_state.pt``), where DeepSpeed's loader copies them by position: a stage holding no
    parameter of a group (no matrix on a stage of only norm and tied embedding) has one group fewer, since
    DeepSpeed drops empty groups, and would take the no-decay group's settings from the decay group. A group
    the folder lacks keeps its own settings (``own``, from before the load) at the saved learning rate."""
    by_name = {group.get("name"): group for group in saved["param_groups"]}
    lr = saved["param_groups"][0].get("lr") if saved["param_groups"] else None
    for group, mine in zip(optimizer.param_groups, own):
        source = by_name.get(mine.get("name"))
        if source is None:
            source = {**mine, "lr": lr} if lr is not None else mine
        group.update({k: v for k, v in source.items() if k != "params"})
