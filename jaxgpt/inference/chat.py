"""Chat for `jaxgpt serve` (`POST /v1/chat/completions`): a conversation becomes one prompt.

With a tokenizer that has a chat template (a model folder's tokenizer_config.json: Llama, Qwen3,
Gemma), the template renders the messages. Otherwise the plain template is the book's Alpaca
format (chapter 7), so a model finetuned with `jaxgpt finetune instruct` answers as it was trained:

    {system message, or the Alpaca preamble}

    ### Instruction:
    {user message}

    ### Response:
    {assistant message}

    ### Instruction:
    {next user message}

    ### Response:

One user message without a system message gives exactly `format_input` + "### Response:", the
finetuning prompt. Under the plain template the model's own "\\n\\n### Instruction:" ends the
answer (an implicit stop string).
"""

from __future__ import annotations

from jaxgpt.data.instructions import PREAMBLE, RESPONSE_MARKER
from jaxgpt.data.tokenizer import TokenizerError

PLAIN_TEMPLATE_STOP = "\n\n### Instruction:"
ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """A conversation that cannot be turned into a prompt (answered 400, naming the message)."""


def check_messages(messages: list[dict]) -> None:
    """A non-empty list; a system message only first; the last message the user's."""
    if not messages:
        raise ChatError("messages must hold at least one message")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise ChatError(f"messages[{i}]: a system message may only come first")
    if messages[-1]["role"] != "user":
        raise ChatError(f"messages[{len(messages) - 1}]: the last message must be the user's "
                        f"(got {messages[-1]['role']!r})")


def plain_prompt(messages: list[dict]) -> str:
    """The conversation in the Alpaca format (see the module's docstring)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else PREAMBLE
    text = system
    for m in messages:
        if m["role"] == "user":
            text += f"\n\n### Instruction:\n{m['content']}"
        elif m["role"] == "assistant":
            text += RESPONSE_MARKER + m["content"]
    return text + RESPONSE_MARKER


class NoTokenizer(ChatError):
    """The served model has no tokenizer: text cannot become tokens (the server's limit, not the request's)."""


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, list[str]]:
    """(prompt text, implicit stop strings) of a checked conversation for this tokenizer. A chat
    template that cannot be rendered is a ChatError naming the template."""
    check_messages(messages)
    if getattr(tokenizer, "name", None) == "ids":
        raise NoTokenizer("the served model has no tokenizer (its folder holds no tokenizer.json), so chat messages "
                          "cannot be turned into tokens; /v1/completions takes a prompt of token ids")
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True), []
        except TokenizerError as e:
            raise ChatError(str(e)) from None
    return plain_prompt(messages), [PLAIN_TEMPLATE_STOP]
