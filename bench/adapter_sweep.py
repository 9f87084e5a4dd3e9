"""How far the generic adapter reaches: every causal-LM model type of transformers, tiny, through ``check_parity``.

For each type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: a tiny config (the TINY sizes its config class
knows, then the type's own OVERRIDES), the causal LM built with random weights and saved with
``save_pretrained``, then ``hybrid_ds.runtime.parity.check_parity`` at 2 stages and, when accepted, 1 stage (what
``hybrid-ds parity FOLDER --stages N`` does). Each type runs in its own process with a timeout, since
some models hang or allocate far more than their tiny sizes suggest. Outcomes:

- ``exact``: loss, logits and every gradient bit for bit at both stage counts;
- ``ok``: within parity's tolerance (1e-5), not bit for bit;
- ``WRONG``: accepted, but parity fails or crashes (must never happen: an accepted model must match);
- ``refused``: a one-line UserError, its common boilerplate stripped;
- ``no tiny model``: the model could not be built or saved from a tiny config.

Writes ``adapter_sweep.md`` (one row per type, counts, refusals grouped by cause) and ``adapter_sweep.json``
to bench/results/; ``--write-readme`` rewrites the generated list of supported model types in docs/models.md.

    python bench/adapter_sweep.py [--types a,b] [--jobs 2] [--timeout 240] [--write-readme] [--from-json] [--update]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS  # noqa: E402

OUTCOMES = ("exact", "ok", "WRONG", "refused", "no tiny model")
README_BEGIN, README_END = "<!-- adapter-sweep:begin -->", "<!-- adapter-sweep:end -->"

# Sizes every tiny model gets where its config class has the key (the generic adapter tests' TINY, and more).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=256, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            num_local_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32,  # deepseek_v2's 1407 gives grouped_mm rows not 16-byte aligned
            n_group=1, topk_group=1,  # group-limited routing: 8 groups of 4 experts leave 0 per group
            rotary_dim=8)             # gptj, codegen: rotary on part of a 16-wide head
# Multi-head latent attention (deepseek_v2/v3 and kin): its head widths must agree with TINY's head_dim.
# Its kv heads are made from one latent per token: as many as query heads.
TINY_MLA = dict(qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, kv_lora_rank=32, q_lora_rank=32,
                num_key_value_heads=4)
# Sub-configs (a vision tower next to the text model) get these too, where their class has the key.
TINY_VISION = dict(image_size=32, patch_size=8, num_channels=3)

# model_type -> keys its config needs beyond TINY to build a tiny model at all (other key names, sizes
# that must agree with each other). Not to make a type pass: a type's structure is what is measured.
OVERRIDES: dict[str, dict[str, Any]] = {
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "dots1": dict(n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32),  # None * int without them
    "dots3_note_text": dict(num_key_value_heads=4),  # the config requires as many kv heads as heads
    "gemma3n_text": dict(num_kv_shared_layers=0),      # 15 of 3 layers share a cache
    "gemma4_assistant": dict(text_config=dict(hidden_size_per_layer_input=0,
                                                          vocab_size_per_layer_input=0)),  # the config requires 0
    "gpt_neo": dict(attention_types=[[["global", "local"], 1], [["global"], 1]]),  # one type per layer
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1, num_experts=4,
                     moe_intermediate_size=32),
    "longcat_flash": dict(n_routed_experts=4, zero_expert_num=2, moe_topk=2,  # 2 GB of experts at default
                          expert_ffn_hidden_size=32),                          # sizes: past the time limit
    "mamba2": dict(num_heads=8),                       # hidden_size * expand must equal num_heads * head_dim
    "moshi": dict(audio_vocab_size=64),
    "plbart": dict(encoder_attention_heads=4, decoder_attention_heads=4),
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=[32, 32]),  # LM head needs a decoder; dims sum to width
    "whisper": dict(encoder_attention_heads=4, decoder_attention_heads=4),
    "xlnet": dict(d_head=16),                          # d_model // n_head
    "zamba": dict(num_hidden_layers=6, attn_layer_period=3, attn_layer_offset=2),  # >= 2 shared-attention layers
    "zamba2": dict(layers_block_type=["mamba", "hybrid", "mamba"]),
    "zaya": dict(num_experts_per_tok=1),               # the only value it supports
}


def tiny_config(model_type: str) -> Any:
    """The tiny config of ``model_type``: TINY and TINY_MLA (and TINY_VISION for sub-configs), then OVERRIDES."""
    import transformers

    cls = transformers.CONFIG_MAPPING[model_type]
    values = _known(cls, TINY)
    if "qk_rope_head_dim" in _known(cls, TINY_MLA):
        values.update(_known(cls, TINY_MLA))
    for name, sub_cls in getattr(cls, "sub_configs", {}).items():
        if isinstance(sub_cls, type) and issubclass(sub_cls, transformers.PreTrainedConfig):
            values[name] = _known(sub_cls, {**TINY, **TINY_VISION})
    for key, value in OVERRIDES.get(model_type, {}).items():
        both_dicts = isinstance(value, dict) and isinstance(values.get(key), dict)
        values[key] = {**values[key], **value} if both_dicts else value
    return cls(**values)


def _known(cls: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    try:
        keys = set(cls().to_dict())
    except Exception:  # noqa: BLE001 - a config class without defaults for some keys
        keys = set(getattr(cls, "__dataclass_fields__", {})) | set(getattr(cls, "__annotations__", {}))
    keys |= set(getattr(cls, "attribute_map", {}))
    return {k: v for k, v in sizes.items() if k in keys}


# --- one type, in its own process -------------------------------------------------------------------------------

BOILERPLATE = re.compile(r"^model\.name: model_type '[^']+' is not supported: it has no named family and the generic "
                         r"decoder-only adapter cannot map it: (.*?); named families: .*$")


TEMP_FOLDER = re.compile(r"^model\.name: /\S+: ")  # other refusals name the swept model's temporary folder


def short_reason(message: str) -> str:
    """The cause in a refusal, without what every refusal says.

    >>> short_reason("model.name: model_type 'x' is not supported: it has no named family and the generic "
    ...              "decoder-only adapter cannot map it: it applies mul to the logits; named families: gpt2; "
    ...              "to add one, add a Family entry in hybrid_ds/config/families.py and a parity test")
    'it applies mul to the logits'
    >>> short_reason("model.name: /tmp/tmpab12: model.layers.1.mlp.experts.w must be merged")
    'model.layers.1.mlp.experts.w must be merged'
    """
    match = BOILERPLATE.match(message)
    return match.group(1) if match else TEMP_FOLDER.sub("", message)[:300]


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def sweep_one(model_type: str, lora: bool = False) -> dict[str, Any]:
    """The outcome of ``model_type``: build and save a tiny model, then parity at 2 stages and 1 (``lora``: of LoRA
    adapters on every linear layer, against peft's ``get_peft_model``)."""
    import torch
    import transformers

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        print("phase: build", file=sys.stderr, flush=True)
        try:
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(folder)
            _runs_in_transformers(folder)
        except Exception as err:  # noqa: BLE001 - whatever stops a tiny model, said in one line
            return {"outcome": "no tiny model", "reason": first_line(err)}
        for attn in ("sdpa", "eager"):  # eager where the model has no sdpa, as a user would set it
            result = _parity(folder, attn, lora)
            if result["outcome"] != "refused" or not any(text in result["reason"] for text in NO_SDPA):
                return {**result, "attn": attn}
    return {**result, "attn": attn}


LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
NO_SDPA = ("does not support SDPA attention; set it to 'eager'",  # hybrid_ds's line (model.attn_implementation)
           "does not support an attention implementation through torch.nn.functional.scaled")  # transformers'


def _parity(folder: str, attn: str, lora: bool = False) -> dict[str, Any]:
    """``check_parity`` of the saved model at 2 stages, then 1, with attention ``attn`` (and LoRA adapters)."""
    from hybrid_ds.config import load_config_dict
    from hybrid_ds.errors import UserError
    from hybrid_ds.runtime.parity import check_parity

    cfg = load_config_dict({"model": {"name": folder, "pretrained": True, "attn_implementation": attn,
                                      **({"lora": LORA} if lora else {})}, "train_micro_batch_size_per_gpu": 1})
    reports = []
    for stages in (2, 1):
        print(f"phase: parity {stages}", file=sys.stderr, flush=True)
        try:
            reports.append(check_parity(cfg, stages))
        except UserError as err:
            if stages == 2:
                return {"outcome": "refused", "reason": short_reason(str(err))}
            return {"outcome": "WRONG", "reason": f"accepted at 2 stages, refused at 1: {short_reason(str(err))}"}
        except Exception as err:  # noqa: BLE001 - accepted, then crashed: as wrong as a mismatch
            return {"outcome": "WRONG",
                    "reason": f"accepted, then parity at {stages} stages crashed: {first_line(err)}"}
    return _judge(reports)


def _runs_in_transformers(folder: str) -> None:
    """The saved model loads and computes a loss in transformers itself, as parity will ask it to.

    Without this a model that transformers cannot run from its own saved folder (a config that does not
    survive the round trip) would show up as a pipeline failure.
    """
    import transformers

    from hybrid_ds.runtime.parity import sample_batch

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    batch = sample_batch(model.config.get_text_config().vocab_size, 16, "causal_lm")
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
          use_cache=False).loss.backward()  # training: no cache (encoder-decoders' and hybrids' caches fail here)


def _judge(reports: list[Any]) -> dict[str, Any]:
    lines = [line for report in reports for line in report.lines()]
    if all(r.exact for r in reports):
        return {"outcome": "exact", "reason": "", "report": lines}
    if all(r.ok for r in reports):
        worst = max(max(r.max_logit_diff, r.max_grad_diff, abs(r.hf_loss - r.pipeline_loss)) for r in reports)
        return {"outcome": "ok", "reason": f"largest difference {worst:.3g}", "report": lines}
    bad = next(r for r in reports if not r.ok)
    return {"outcome": "WRONG", "reason": f"parity fails at {bad.stages} stages: logits {bad.max_logit_diff:.3g}, "
                                          f"grads {bad.max_grad_diff:.3g} ({bad.worst_grad})", "report": lines}


# --- the sweep ---------------------------------------------------------------------------------------------------

def run_one(model_type: str, timeout: float, lora: bool = False) -> dict[str, Any]:
    """``sweep_one`` in a fresh process, with a time limit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", model_type, *(["--lora"] if lora else [])],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        phases = re.findall(r"phase: (.*)", stderr)
        phase = phases[-1] if phases else "start"
        outcome = "no tiny model" if phase in ("start", "build") else "WRONG"
        result = {"outcome": outcome, "reason": f"timed out after {timeout:g} s ({phase})"}
    else:
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            result = json.loads(lines[-1])
        else:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
            if proc.returncode == -9:
                tail = "killed (SIGKILL: out of memory?)"
            phases = re.findall(r"phase: (.*)", proc.stderr)
            outcome = "no tiny model" if not phases or phases[-1] == "build" else "WRONG"
            result = {"outcome": outcome, "reason": f"process died (exit {proc.returncode}): {tail}"}
    return {"type": model_type, **result, "seconds": round(time.time() - start, 1)}


def sweep(types: list[str], jobs: int, timeout: float, lora: bool = False) -> list[dict[str, Any]]:
    results = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for result in pool.map(lambda t: run_one(t, timeout, lora), types):
            print(f"{result['type']:28s} {result['outcome']:14s} {result['reason'][:110]}", flush=True)
            results.append(result)
    return sorted(results, key=lambda r: r["type"])


def all_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# --- writing it down ---------------------------------------------------------------------------------------------

def cause(reason: str) -> str:
    """A refusal reason with what names one model taken out (paths, numbers, class names), to group by.

    >>> cause("block 2 gets the mask of create_sliding_window_causal_mask where the pipeline would use x")
    'block N gets the mask of create_sliding_window_causal_mask where the pipeline would use x'
    >>> cause("it calls model.layers.0.mlp (GraniteMLP) in a way the pipeline does not reproduce")
    'it calls PATH (CLASS) in a way the pipeline does not reproduce'
    >>> cause("its input embedding is not a direct child of roberta")
    'its input embedding is not a direct child of BASE'
    """
    reason = re.sub(r"\([A-Z]\w*\)", "(CLASS)", reason)
    reason = re.sub(r"(direct child of )\w+$", r"\1BASE", re.sub(r"\(found: [^)]*\)", "(found: ...)", reason))
    reason = re.sub(r"\b(?:model|transformer|backbone|language_model|lm_head)(?:\.\w+)+|\b\w+\.\d+(?:\.\w+)*", "PATH",
                    reason)
    reason = re.sub(r"\(\w+Error: .*", "(ERROR)", reason)
    return re.sub(r"\b\d+\b", "N", reason)


def table(results: list[dict[str, Any]], named: dict[str, str], lora: bool = False) -> str:
    """The markdown table; ``named`` maps each named family to its task (what parity checks it as)."""
    counts = Counter(r["outcome"] for r in results)
    wrong = [r for r in results if r["outcome"] == "WRONG"]
    what = (f"with LoRA adapters ({LORA}) against peft {_version('peft')}'s `get_peft_model`" if lora else "")
    out = [f"# Generic adapter sweep{', LoRA' if lora else ''}", "",
           f"{len(results)} causal-LM model types of transformers {_version()}, each a tiny random model saved "
           f"with `save_pretrained`, then `check_parity` at 2 stages and 1 {what}".rstrip() +
           f" (`python bench/adapter_sweep.py{' --lora' if lora else ''}`).", "",
           " | ".join(f"{o}: {counts.get(o, 0)}" for o in OUTCOMES), ""]
    if wrong:
        out += ["**WRONG (accepted, parity fails): " + ", ".join(r["type"] for r in wrong) + "**", ""]
    out += ["| type | outcome | reason |", "|---|---|---|"]
    for r in results:
        reason = short_reason(r["reason"])  # results of older versions of this script kept the temporary folder
        kind = r["outcome"] + (" (named family)" if r["type"] in named and r["outcome"] in ("exact", "ok") else "")
        kind += " (eager)" if r.get("attn") == "eager" else ""
        if r["type"] in named and named[r["type"]] != "causal_lm":
            reason = f"checked as its named family's task, {named[r['type']]}, not as a causal LM; {reason}".strip("; ")
        out.append(f"| {r['type']} | {kind} | {reason.replace('|', '/')} |")
    refused = [(r["type"], cause(short_reason(r["reason"]))) for r in results if r["outcome"] == "refused"]
    groups = Counter(text for _, text in refused)
    out += ["", "## Refusals by cause", "", "| types | cause | examples |", "|---|---|---|"]
    for text, n in groups.most_common():
        examples = [model_type for model_type, group in refused if group == text]
        out.append(f"| {n} | {text.replace('|', '/')} | {', '.join(examples[:4])} |")
    return "\n".join(out) + "\n"


def readme_section(results: list[dict[str, Any]], named: dict[str, str]) -> str:
    """The generated list of supported model types that README holds between the sweep's markers."""
    def types(outcome: str, generic: bool) -> list[str]:
        return [f"`{r['type']}`" + (" (eager)" if r.get("attn") == "eager" else "") for r in results
                if r["outcome"] == outcome and (r["type"] not in named) == generic]

    exact, close = types("exact", True), types("ok", True)
    named_exact = sorted(r["type"] for r in results if r["type"] in named and r["outcome"] == "exact")
    lines = [README_BEGIN,
             f"Generated by `python bench/adapter_sweep.py --write-readme` (transformers {_version()}; the full table "
             "with every refusal's reason is `bench/results/adapter_sweep.md`; \"(eager)\": the model has no sdpa "
             "attention: `model.attn_implementation` left unset picks eager for it, as Hugging Face does).", "",
             f"- Named families, bit for bit: {', '.join(f'`{n}`' + _task_note(named[n]) for n in named_exact)}.",
             f"- Through the generic adapter, bit for bit at 1 and 2 stages ({len(exact)}): {', '.join(exact)}."]
    if close:
        lines.append(f"- Through the generic adapter, within 1e-5 ({len(close)}): {', '.join(close)}.")
    counts = Counter(r["outcome"] for r in results)
    lines += [f"- Of the {len(results)} causal-LM types transformers registers, {counts['refused']} are refused with "
              f"a one-line reason and {counts['no tiny model']} could not be built from a tiny config.", README_END]
    return "\n".join(lines)


def _task_note(task: str) -> str:
    return "" if task == "causal_lm" else f" ({task.replace('_', ' ')})"


def replace_between_markers(text: str, section: str) -> str:
    """``text`` with what lies between the markers (markers included) replaced by ``section``.

    >>> replace_between_markers("a\\n<!-- adapter-sweep:begin -->\\nold\\n<!-- adapter-sweep:end -->\\nb", "new")
    'a\\nnew\\nb'
    """
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    return text[:start] + section + text[end:]


def _version(package: str = "transformers") -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", help="comma-separated model types (default: every causal-LM type)")
    parser.add_argument("--jobs", type=int, default=2, help="types checked at once, each in its own process")
    parser.add_argument("--timeout", type=float, default=240, help="seconds one type may take")
    parser.add_argument("--write-readme", action="store_true", help="rewrite README's list of supported types")
    parser.add_argument("--out", default="adapter_sweep", help="result file name in bench/results/, no extension")
    parser.add_argument("--from-json", action="store_true",
                        help="sweep nothing: write the table (and README) again from the last results JSON")
    parser.add_argument("--update", action="store_true",
                        help="with --types: replace those types' rows in the last results JSON, keep the others")
    parser.add_argument("--lora", action="store_true", help="parity of LoRA adapters (r 4, all-linear) against "
                                                            "peft's get_peft_model; results to --out adapter_sweep_lora")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the worker: one type, its result as JSON on stdout
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(sweep_one(args.one, args.lora)))
        return 0
    if args.lora and args.write_readme:
        parser.error("--write-readme lists the plain sweep's types; the LoRA sweep writes its own table only")
    if args.lora and args.out == "adapter_sweep":
        args.out = "adapter_sweep_lora"
    if args.write_readme and args.types and not (args.from_json or args.update):
        parser.error("--write-readme lists what a full sweep found: drop --types or add --update")
    from hybrid_ds.config.families import FAMILIES

    named, saved = {name: family.task for name, family in FAMILIES.items()}, RESULTS / f"{args.out}.json"
    if args.from_json:
        results = json.loads(saved.read_text())["results"]
    else:
        results = sweep(args.types.split(",") if args.types else all_types(), args.jobs, args.timeout, args.lora)
        if args.update and args.types:  # the other types' rows from the last run, in its order
            fresh = {r["type"]: r for r in results}
            last = json.loads(saved.read_text())["results"]
            results = [fresh.pop(r["type"], r) for r in last] + list(fresh.values())
        RESULTS.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"transformers": _version(), "results": results}, indent=1))
    (RESULTS / f"{args.out}.md").write_text(table(results, named, args.lora))
    if args.write_readme:
        readme = REPO / "docs" / "models.md"  # the supported-types list, linked from the README
        readme.write_text(replace_between_markers(readme.read_text(), readme_section(results, named)))
    print(" | ".join(f"{o}: {sum(r['outcome'] == o for r in results)}" for o in OUTCOMES))
    return 1 if any(r["outcome"] == "WRONG" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
