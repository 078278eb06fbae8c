"""Checks on canonical conversations before any model is loaded.

A legal conversation: an optional system message first, then turns that start with the user,
with each user message answered by the assistant (tool results may follow an assistant tool call
and are answered by the assistant), ending with an assistant reply. Content is a non-empty string.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant", "tool")

# which roles may follow which; None is the start of the conversation
_NEXT = {
    None: {"system", "user"},
    "system": {"user"},
    "user": {"assistant"},
    "assistant": {"user", "tool"},
    "tool": {"tool", "assistant"},
}


def check_messages(messages) -> str | None:
    """The first problem with a conversation, as a short reason, or None when it is valid."""
    if not isinstance(messages, list) or not messages:
        return "empty conversation: no messages"
    prev = None
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role is None:
            return f"message {i} has no role"
        if role not in ROLES:
            return f"message {i} has unknown role {role!r} (known: {', '.join(ROLES)})"
        if content is None:
            return f"message {i} ({role}) has null content"
        if not isinstance(content, str):
            return f"message {i} ({role}) content is {type(content).__name__}, expected a string"
        if not content.strip():
            return f"message {i} ({role}) has empty content"
        if role not in _NEXT[prev]:
            after = f"after a {prev} message" if prev else "at the start"
            return f"message {i}: role {role!r} cannot come {after} (expected {' or '.join(sorted(_NEXT[prev]))})"
        prev = role
    if prev != "assistant":
        return f"no assistant reply at the end (last message is {prev!r}): nothing to train on"
    return None


def check_text(text) -> str | None:
    if text is None:
        return "text is null"
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, expected a string"
    if not text.strip():
        return "text is empty"
    return None
