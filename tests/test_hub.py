"""Names that may be on the Hugging Face Hub: the local cache first, then the hub asked once; a name neither cached nor
reachable is one line at once, never half a minute of retries; a local path is never sent to the hub; the offline
asset's name works wherever a model or tokenizer is named."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

from hybrid_ds import assets, hub
from hybrid_ds.cli import main
from hybrid_ds.config import DataConfig
from hybrid_ds.errors import UserError


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_a_name_neither_cached_nor_reachable_is_one_line_without_retries(tmp_path):
    """Network on (HF_HUB_OFFLINE unset) but the hub unreachable (HF_ENDPOINT a closed port), an empty cache: validate
    of a hub model name stops with one line naming the name, the cache and HF_HUB_OFFLINE. Before, huggingface_hub's
    retries printed a line per attempt ("... thrown while requesting HEAD ...") for half a minute first."""
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"model": {"name": "acme/not-cached", "pretrained": True},
                               "train_micro_batch_size_per_gpu": 1}))
    env = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}, "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "hybrid_ds.cli", "validate", str(run)], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if "real_accelerator" not in line]  # DeepSpeed's import notice
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("hybrid-ds: error: model.name: 'acme/not-cached' is not a local folder and the Hugging "
                               f"Face cache ({tmp_path / 'hf' / 'hub'}) holds no model config of it; the hub "
                               f"(http://127.0.0.1:"), lines[0]
    assert "cannot be reached" in lines[0] and "HF_HUB_OFFLINE=1 skips asking the hub" in lines[0]


def test_the_hub_is_asked_only_for_a_name_the_cache_lacks(monkeypatch):
    calls = []

    def load(local_files_only):
        calls.append(local_files_only)
        if local_files_only and not cached:
            raise OSError("not in the cache")
        return "loaded"

    monkeypatch.setattr(hub, "hub_unreachable", lambda: pytest.fail("the hub was asked for a cached name"))
    cached = True
    assert hub.from_cache_or_hub(load, "model.name", "acme/x", "model config") == "loaded" and calls == [True]
    calls.clear()
    cached = False
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)  # the hub answers: a download, as transformers does
    assert hub.from_cache_or_hub(load, "model.name", "acme/x", "model config") == "loaded" and calls == [True, False]
    calls.clear()
    monkeypatch.setattr(hub, "hub_unreachable", lambda: "the hub cannot be reached: refused")
    with pytest.raises(UserError, match="holds no model config of it; the hub cannot be reached: refused"):
        hub.from_cache_or_hub(load, "model.name", "acme/x", "model config")
    assert calls == [True]


def test_the_hub_is_asked_once_with_a_timeout(monkeypatch):
    from huggingface_hub import constants

    asked = []

    class Session:
        def head(self, url, timeout):
            asked.append((url, timeout))
            raise ConnectionError("refused")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.utils.get_session", lambda: Session())
    hub.hub_unreachable.cache_clear()
    try:
        assert hub.hub_unreachable() == f"the hub ({constants.ENDPOINT}) cannot be reached: refused"
        assert hub.hub_unreachable() and asked == [(constants.ENDPOINT, hub.HUB_TIMEOUT_S)]  # once per process
    finally:
        hub.hub_unreachable.cache_clear()


def test_a_hub_dataset_not_cached_is_one_line(monkeypatch):
    from hybrid_ds.data.sources import load_documents

    with pytest.raises(UserError) as err:
        load_documents(DataConfig(source="acme/some-dataset"))
    assert str(err.value).startswith("data.source: 'acme/some-dataset' is not a local folder and the Hugging Face "
                                     "cache (") and "holds no dataset of it; HF_HUB_OFFLINE is set;" in str(err.value)


def test_a_local_path_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    """A relative path whose folder exists is a path, misspelt or not: "no such file", with the near name."""
    from hybrid_ds.data.sources import load_documents

    monkeypatch.setattr(hub, "hub_unreachable", lambda: pytest.fail("a local path was sent to the hub"))
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "notes.txt").write_text("one\n\ntwo\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        load_documents(DataConfig(source="mydata/notes.tx"))
    assert str(err.value) == ("data.source: 'mydata/notes.tx': no such file or no files match; did you mean "
                              "'mydata/notes.txt'?")
    with pytest.raises(UserError, match="no such file"):
        load_documents(DataConfig(source="a/b/c"))


def test_presets_lists_the_offline_models(capsys, monkeypatch):
    from hybrid_ds.config import presets

    monkeypatch.setattr(presets, "PRESETS", {"gpt2-tiny": presets.PRESETS["gpt2-tiny"]})  # counted on the meta device
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "offline models (model.name with pretrained: true, or data.tokenizer; no download):" in out
    assert all(f"\n{name:<14} " in out for name in assets.OFFLINE_MODELS)


@pytest.mark.skipif(importlib.util.find_spec(assets.SMOLLM2_PACKAGE) is None, reason="SmolLM2 not installed")
def test_the_offline_model_names_a_tokenizer_too(monkeypatch):
    from hybrid_ds.data.packing import load_tokenizer

    monkeypatch.setattr(hub, "hub_unreachable", lambda: pytest.fail("the offline asset was looked up on the hub"))
    tokenizer = load_tokenizer(assets.SMOLLM2_NAME, "causal_lm")
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152
