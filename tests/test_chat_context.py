"""The prompt keeps the system prompt and the most recent messages that fit,
counted with the bundled model's own tokenizer and chat template."""

from __future__ import annotations

import pytest

from chat import selectors, services, sessions_io
from chat.context import PromptTooLong, build_prompt, build_prompt_for_reply
from chat.models import Conversation, Message
from inference.engine import Engine
from inference.types import ChatMessage, ContextLengthExceeded
from tests.base import add_reply, make_conversation

pytestmark = pytest.mark.django_db

SYSTEM = "You are a terse assistant."


def long_turns(count: int) -> list[str]:
    """Turns of about a hundred tokens each, each one different."""
    return [f"Turn {i}: " + " ".join(f"word{i}x{j}" for j in range(30)) for i in range(count)]


def prompt_of(conversation: Conversation, engine: Engine, *, max_messages: int = 20, max_tokens: int = 256):
    return build_prompt(
        conversation=conversation,
        branch=selectors.shown_branch(conversation),
        max_messages=max_messages,
        context_size=engine.n_ctx,
        max_tokens=max_tokens,
        count_tokens=engine.count_prompt_tokens,
    )


def test_it_keeps_the_last_twenty_messages_by_default(engine: Engine) -> None:
    turns = [f"message {i}" for i in range(31)]
    conversation, messages = make_conversation(*turns, system_prompt=SYSTEM)

    prompt = prompt_of(conversation, engine)

    assert prompt.messages == (
        ChatMessage("system", SYSTEM),
        *(ChatMessage(m.role, m.content) for m in messages[-20:]),  # type: ignore[arg-type]
    )
    assert prompt.included_ids == tuple(m.id for m in messages[-20:])
    assert prompt.left_out_ids == tuple(m.id for m in messages[:11])
    assert prompt.view_starts_at == messages[11].id
    assert prompt.trimmed
    assert prompt.tokens == engine.count_prompt_tokens(prompt.messages)


def test_it_sends_everything_when_everything_fits(engine: Engine) -> None:
    conversation, _ = make_conversation("Hi", "Hello!", "Capital of France?")
    prompt = prompt_of(conversation, engine)
    assert [m.content for m in prompt.messages] == ["Hi", "Hello!", "Capital of France?"]
    assert not prompt.trimmed
    assert prompt.view_starts_at is None
    assert prompt.skipped_ids == ()


def test_it_trims_to_the_context_window_with_the_models_tokenizer(engine: Engine) -> None:
    conversation, messages = make_conversation(*long_turns(15), system_prompt=SYSTEM)
    max_tokens = engine.n_ctx - 600  # room for about five of these turns
    limit = engine.n_ctx - max_tokens

    prompt = prompt_of(conversation, engine, max_tokens=max_tokens)

    kept = len(prompt.included_ids)
    assert 2 <= kept < 15
    assert prompt.included_ids == tuple(m.id for m in messages[-kept:])
    assert prompt.left_out_ids == tuple(m.id for m in messages[:-kept])
    assert prompt.messages[0] == ChatMessage("system", SYSTEM)
    assert prompt.tokens == engine.count_prompt_tokens(prompt.messages) <= limit
    # As many as fit: one more message would not.
    one_more = [prompt.messages[0], ChatMessage(messages[-kept - 1].role, messages[-kept - 1].content)]  # type: ignore[arg-type]
    assert engine.count_prompt_tokens([*one_more, *prompt.messages[1:]]) > limit


def test_it_never_drops_the_system_prompt_or_the_newest_message(engine: Engine) -> None:
    conversation, messages = make_conversation(*long_turns(5), system_prompt=SYSTEM)
    alone = engine.count_prompt_tokens(
        [ChatMessage("system", SYSTEM), ChatMessage("user", messages[-1].content)]
    )

    prompt = prompt_of(conversation, engine, max_tokens=engine.n_ctx - alone)

    assert prompt.messages == (ChatMessage("system", SYSTEM), ChatMessage("user", messages[-1].content))
    assert prompt.included_ids == (messages[-1].id,)
    assert prompt.view_starts_at == messages[-1].id
    assert prompt.tokens == alone


def test_it_says_how_many_tokens_a_message_too_long_has_and_how_many_fit(engine: Engine) -> None:
    conversation, _ = make_conversation("Hi", "Hello!", "word " * 3000, system_prompt=SYSTEM)

    with pytest.raises(PromptTooLong) as caught:
        prompt_of(conversation, engine, max_tokens=512)

    error = caught.value
    assert isinstance(error, ContextLengthExceeded)
    assert error.limit == engine.n_ctx - 512
    assert error.tokens == engine.count_prompt_tokens(
        [ChatMessage("system", SYSTEM), ChatMessage("user", "word " * 3000)]
    )
    assert error.tokens > error.limit
    assert f"is {error.tokens} tokens long" in str(error)
    assert f"fits at most {error.limit} prompt tokens" in str(error)


def test_it_sends_stopped_and_interrupted_replies_but_not_errors_or_empty_ones(engine: Engine) -> None:
    conversation, (q1,) = make_conversation("First question")
    stopped = add_reply(conversation, q1, "A stopped rep", status=Message.Status.STOPPED)
    q2 = services.do_add_user_message(conversation=conversation, content="Second question")
    failed = add_reply(conversation, q2, "Garbl", status=Message.Status.ERROR, error="engine failed")
    q3 = services.do_add_user_message(conversation=conversation, content="Third question")
    empty = add_reply(conversation, q3, "", status=Message.Status.STOPPED)
    q4 = services.do_add_user_message(conversation=conversation, content="Fourth question")
    interrupted = services.do_start_reply(conversation=conversation, parent=q4)
    services.do_append_to_reply(message=interrupted, text="Cut o")
    services.do_mark_interrupted_replies()
    q5 = services.do_add_user_message(conversation=conversation, content="Fifth question")
    streaming = services.do_start_reply(conversation=conversation, parent=q5)
    services.do_append_to_reply(message=streaming, text="In progr")
    conversation.refresh_from_db()

    prompt = prompt_of(conversation, engine)

    assert [m.content for m in prompt.messages] == [
        "First question",
        "A stopped rep",
        "Second question",
        "Third question",
        "Fourth question",
        "Cut o",
        "Fifth question",
    ]
    assert set(prompt.skipped_ids) == {failed.id, empty.id, streaming.id}
    assert stopped.id in prompt.included_ids
    assert prompt.left_out_ids == ()


def test_it_keeps_the_system_messages_that_open_an_imported_session(engine: Engine) -> None:
    data = {
        "imported": [{"role": "system", "content": "Answer in French."}]
        + [
            {"role": "user" if i % 2 == 0 else "assistant", "content": turn}
            for i, turn in enumerate(long_turns(9))
        ]
    }
    sessions_io.import_sessions(sessions_io.validate_sessions(data, model_name="smollm2-135m"))
    conversation = Conversation.objects.get(external_id="imported")

    prompt = prompt_of(conversation, engine, max_messages=4, max_tokens=256)

    branch = selectors.shown_branch(conversation)
    assert prompt.messages[0] == ChatMessage("system", "Answer in French.")
    assert prompt.included_ids == (branch[0].id, *(m.id for m in branch[-4:]))
    assert prompt.left_out_ids == tuple(m.id for m in branch[1:-4])


def test_it_builds_the_prompt_with_the_conversations_model_and_the_configured_history(
    engine: Engine, settings
) -> None:
    settings.CHATSITE_MAX_HISTORY_MESSAGES = 3
    conversation, _ = make_conversation("a", "b", "c", "d", "e")
    prompt = build_prompt_for_reply(
        conversation=conversation, branch=selectors.shown_branch(conversation), max_tokens=64
    )
    assert [m.content for m in prompt.messages] == ["c", "d", "e"]
    assert prompt.tokens == engine.count_prompt_tokens(prompt.messages)


def test_it_refuses_a_branch_with_nothing_to_answer(engine: Engine) -> None:
    conversation, _ = make_conversation()
    with pytest.raises(ValueError, match="no message to reply to"):
        prompt_of(conversation, engine)
