"""Chat and prompt/completion rows (``data.format``) -> token ids and the mask of the tokens the loss predicts.

chat: the tokenizer's own ``chat_template`` renders the conversation. Assistant turn ``i`` is labelled as the
tokens that ``messages[:i + 1]`` adds to ``messages[:i]`` rendered with the generation prompt: its content and
whatever the template closes a turn with (ChatML's ``<|im_end|>`` and newline), never the ``assistant``
header, which the generation prompt already holds. This needs no ``{% generation %}`` markers, only that each
rendering begins with the one before (true of ordinary templates; one that rewrites earlier turns is refused).

prompt_completion: plain text, as TRL does for non-conversational pairs: the prompt tokenized as
``tokenizer(prompt)`` (with its special tokens, e.g. BOS), the completion on its own followed by EOS, and only
the completion and EOS labelled. Tokenizing the two apart keeps the boundary where inference has it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hybrid_ds.errors import UserError, suggest

ROLES = ("system", "developer", "user", "assistant", "tool")
_VERSE_EVERY = 16  # builtin set: one conversation per 16th verse (1,900 train, 40 eval: seconds to render)


class BadRow(Exception):
    """What is wrong in one row: ``field`` is where (``messages[2].role``), ``key`` the config key to blame."""

    def __init__(self, field: str, message: str, key: str = "data.source"):
        super().__init__(f"{field} {message}")
        self.field, self.message, self.key = field, message, key


def columns(data_format: str) -> tuple[str, ...]:
    """The packed rows' columns (after renaming from the config's ``*_column``) of a format."""
    return ("messages",) if data_format == "chat" else ("prompt", "completion")


def check_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = repr(tokenizer.name_or_path) if tokenizer.name_or_path else "the offline default tokenizer"
        raise UserError("data.tokenizer", f"{name} has no chat_template to render data.format \"chat\"; use a "
                                          "tokenizer that has one (an instruct model's) or data.format "
                                          "\"prompt_completion\"")


def encoder(data_format: str, tokenizer: Any):
    """``encode(*values) -> (ids, labelled)`` for one row's ``columns(data_format)`` values."""
    if data_format == "chat":
        check_template(tokenizer)
        return lambda messages: chat_tokens(messages, tokenizer)
    return lambda prompt, completion: prompt_completion_tokens(prompt, completion, tokenizer)


def chat_tokens(messages: Any, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and, per token, 1 where the loss predicts it (assistant turns)."""
    messages = checked_messages(messages)
    ids: list[int] = []
    labelled: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            _extend(ids, labelled, _render(tokenizer, messages[:i], True), 0, i)
            _extend(ids, labelled, _render(tokenizer, messages[:i + 1], False), 1, i)
    if messages[-1]["role"] != "assistant":  # turns after the last answer are context for nothing, but kept
        _extend(ids, labelled, _render(tokenizer, messages, False), 0, len(messages) - 1)
    return ids, labelled


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    from jinja2 import TemplateError

    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                                  return_dict=False))
    except TemplateError as err:  # a template's raise_exception, e.g. "roles must alternate user/assistant"
        raise BadRow("messages", f"is refused by the tokenizer's chat_template: {err}") from None


def _extend(ids: list[int], labelled: list[int], rendered: list[int], label: int, turn: int) -> None:
    if rendered[:len(ids)] != ids:
        raise BadRow(f"messages[{turn}]", "cannot be masked: the tokenizer's chat_template renders the conversation "
                                          "up to this turn as tokens that do not begin with its rendering of the "
                                          "turns before (it rewrites earlier turns), so the answer's tokens are not "
                                          "known; use a template without that rewriting", key="data.tokenizer")
    labelled += [label] * (len(rendered) - len(ids))
    ids[:] = rendered


def checked_messages(messages: Any) -> list[dict]:
    """The row's messages without null fields (Arrow fills a key another row has with null), or a BadRow."""
    if messages is None:
        raise BadRow("messages", "is missing")
    if not isinstance(messages, list) or not messages:
        raise BadRow("messages", f"must be a non-empty list of {{role, content}}, got {str(messages)[:60]!r}")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRow(f"messages[{i}]", f"must be a {{role, content}} object, got {str(message)[:60]!r}")
        message = {k: v for k, v in message.items() if v is not None}
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            raise BadRow(f"messages[{i}].{'role' if role is None else 'content'}", "is missing")
        if role not in ROLES:
            raise BadRow(f"messages[{i}].role", f"{role!r} is not a role; {suggest(role, ROLES)}")
        if not isinstance(content, str):
            raise BadRow(f"messages[{i}].content", f"must be text, got {type(content).__name__}")
        if not content.strip():
            raise BadRow(f"messages[{i}].content", "is empty")
        cleaned.append(message)
    if not any(m["role"] == "assistant" for m in cleaned):
        raise BadRow("messages", "has no assistant turn: nothing to learn from")
    return cleaned


def prompt_completion_tokens(prompt: Any, completion: Any, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``tokenizer(prompt)`` then the completion's tokens and EOS; 1 where the loss predicts a token."""
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise BadRow(name, "is missing")
        if not isinstance(value, str):
            raise BadRow(name, f"must be text, got {type(value).__name__}")
    if not completion.strip():
        raise BadRow("completion", "is empty")
    if tokenizer.eos_token_id is None:
        raise UserError("data.tokenizer", f"{tokenizer.name_or_path!r} has no EOS token to end completions")
    prompt_ids = list(tokenizer(prompt)["input_ids"]) if prompt else []
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def select_columns(dataset: Any, data: Any) -> Any:
    """The format's columns of ``dataset``, renamed to ``columns(format)``, and ``row``: each row's index."""
    keys = {"messages": "data.messages_column", "prompt": "data.prompt_column",
            "completion": "data.completion_column"}
    given = {name: getattr(data, keys[name].removeprefix("data.")) for name in columns(data.format)}
    for name, column in given.items():
        if column not in dataset.column_names:
            raise UserError(keys[name], f"{column!r} is not a column of {data.source!r}; columns: "
                                        f"{dataset.column_names}")
        kind = getattr(dataset.features[column], "dtype", None)
        if name != "messages" and kind not in ("string", "large_string", "null"):
            raise UserError(keys[name], f"{column!r} holds {kind or type(dataset.features[column]).__name__} "
                                        "values, not text")
    dataset = dataset.select_columns(list(given.values()))
    return numbered(dataset.rename_columns({column: name for name, column in given.items() if column != name}))


def numbered(dataset: Any) -> Any:
    """``dataset`` with a ``row`` column: each row's index, kept through the train/eval split for errors."""
    return dataset.add_column("row", list(range(len(dataset))))


def builtin_rows(data_format: str, verses: list[tuple[str, str, str, str]],
                 held_out: Callable[[int], bool]) -> tuple[dict, dict]:
    """(train, eval) rows made from the built-in corpus's ``(book, chapter, verse, text)``, deterministic.

    Every 16th verse gives one conversation: the user quotes it and asks which book it is from, the assistant
    names the book; the user asks for its first five words, the assistant quotes them. The chapters (counted
    from 0) that ``held_out`` names give the eval rows, as in the text corpus. ``prompt_completion``: the first
    exchange as plain text. Learnable in a few dozen steps: the answers' form (a bare name, an exact quote)
    at once, the books from the verses' names and words more slowly.
    """
    splits: tuple[dict, dict] = ({}, {})
    chapter, previous = -1, None
    for n, (book, number, _, text) in enumerate(verses):
        if (book, number) != previous:
            chapter, previous = chapter + 1, (book, number)
        if n % _VERSE_EVERY:
            continue
        question = f"Which book of the Bible is this verse from?\n\n\"{text}\""
        if data_format == "chat":
            row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": book},
                                {"role": "user", "content": "Quote its first five words."},
                                {"role": "assistant", "content": " ".join(text.split()[:5])}]}
        else:
            row = {"prompt": f"{question}\nAnswer:", "completion": f" {book}"}
        for key, value in row.items():
            splits[held_out(chapter)].setdefault(key, []).append(value)
    return splits
