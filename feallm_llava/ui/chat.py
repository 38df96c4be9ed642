"""The Chat tab's work, without Gradio: a chat history -> the turns and the image to send.

LLaVA-1.5 sees one image per conversation, so a conversation starts at the latest user
message that carried an image (earlier turns are about another picture and are left
out); without any image it is text only. The UI's own error replies (`ERROR_MARK`) and
the question they answered are left out too. Messages come in Gradio's "messages" format:
`{"role": "user" | "assistant", "content": ...}` where content is a string, a file
(`{"path": ...}` or `{"file": {"path": ...}}`), or a list of parts
(`{"type": "text", "text": ...}`, `{"type": "file", "file": {"path": ...}}`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from feallm_llava.ui.backends import Turn

ERROR_MARK = "\u26a0\ufe0f"  # opens the UI's own error replies, which are not sent back to the model


@dataclass
class _Message:
    role: str
    text: str
    files: list[str]


def _parts(content) -> Iterable[tuple[str, str]]:
    """('text' | 'file', value) of one message's content, in order."""
    if content is None:
        return
    if isinstance(content, str):
        yield "text", content
        return
    if isinstance(content, (list, tuple)):
        for part in content:
            yield from _parts(part)
        return
    if isinstance(content, dict):
        if content.get("type") == "text" or ("text" in content and "path" not in content and "file" not in content):
            yield "text", str(content.get("text") or "")
            return
        inner = content.get("file") if isinstance(content.get("file"), dict) else content
        path = inner.get("path") if isinstance(inner, dict) else None
        if path:
            yield "file", str(path)
        return
    path = getattr(content, "path", None)  # a FileData object
    if path:
        yield "file", str(path)


def _message(message) -> _Message:
    role = message.get("role") if isinstance(message, dict) else getattr(message, "role", "")
    content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
    texts, files = [], []
    for kind, value in _parts(content):
        (texts if kind == "text" else files).append(value)
    return _Message(str(role), "\n".join(t for t in texts if t).strip(), files)


def conversation(history: Sequence, text: str, files: Sequence[str] = ()) -> tuple[list[Turn], str | None]:
    """(turns ending with the new question, the image path or None) for a new message
    `text` (+ `files`) after `history`."""
    messages = [_message(m) for m in history] + [_Message("user", (text or "").strip(), [str(f) for f in files])]
    start, image = 0, None
    for i, m in enumerate(messages):
        if m.role == "user" and m.files:
            start, image = i, m.files[-1]
    turns: list[Turn] = []
    question: list[str] = []
    for m in messages[start:]:
        if m.role == "user":
            if m.text:
                question.append(m.text)
        elif m.role == "assistant" and question:
            if not m.text.startswith(ERROR_MARK):  # a failed exchange is not context
                turns.append(Turn("\n".join(question), m.text))
            question = []
    turns.append(Turn("\n".join(question)))
    return turns, image
