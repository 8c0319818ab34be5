"""Turn an EngineRequest's prompt or chat messages into prompt token ids (runs on the engine thread)."""

from __future__ import annotations

from jinja2 import TemplateError

from helix_serve.serving.protocol import EngineRequest


class ChatTemplateError(ValueError):
    """The model's chat template refused the messages (e.g. roles that must alternate): the client's input."""


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template, or a plain `role: content` transcript when it has none."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:  # the template's own raise_exception(...), or one it cannot render
            raise ChatTemplateError(f"the model's chat template refused these messages: {exc}") from exc
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def prompt_token_ids(tokenizer, request: EngineRequest) -> list[int]:
    if request.messages is not None:
        # NOTE: the rendered template already holds any BOS text; don't let the tokenizer add another.
        return tokenizer(render_chat(tokenizer, request.messages), add_special_tokens=False).input_ids
    return tokenizer(request.prompt).input_ids
