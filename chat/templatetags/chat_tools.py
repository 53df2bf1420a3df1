"""Tool calls and tool results as the branch shows them (``templates/chat/_branch.html``).

Both are untrusted text (a model's arguments, a script's tool output): the
template prints them autoescaped, as plain text, and never through Markdown
(:mod:`chat.rendered` renders no tool message). ``Message.tool_calls`` is
read defensively, as :mod:`chat.context` reads it: a row edited by hand may
hold anything, and a call that is not an object is left out rather than
break the page.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from django import template

from chat.models import Message
from chat.selectors import BranchEntry

register = template.Library()


@dataclass(frozen=True)
class ShownCall:
    """One tool call of an assistant message, as text."""

    id: str
    name: str
    arguments: str


@register.filter(name="tool_calls")
def tool_calls(message: Message) -> list[ShownCall]:
    """``{{ message|tool_calls }}``: the message's calls, each field a string."""
    return [ShownCall(call.id, call.name, call.arguments) for call in message.calls()]


@register.simple_tag
def tool_call_names(entries: Sequence[BranchEntry]) -> dict[uuid.UUID, str]:
    """``{% tool_call_names entries as names %}``: for each tool message of the
    branch, the name of the call it answers, by the tool message's id.

    The call is the nearest one before the result with its ``tool_call_id``
    (some models number their calls ``call_0``, ``call_1``... in every turn,
    so an id may come back). A result whose call is not on the branch has no
    entry. One pass over the branch, whatever its length."""
    latest: dict[str, str] = {}
    names: dict[uuid.UUID, str] = {}
    for entry in entries:
        message = entry.message
        if message.role == Message.Role.TOOL:
            name = latest.get(message.tool_call_id)
            if name:
                names[message.id] = name
        else:
            latest.update((call.id, call.name) for call in tool_calls(message))
    return names


@register.filter(name="answered_call")
def answered_call(message: Message, names: Mapping[uuid.UUID, str]) -> str:
    """``{{ message|answered_call:names }}``: the name of the call a tool
    message answers ("" when unknown), from :func:`tool_call_names`."""
    return names.get(message.id, "")
