"""Views of the chat site.

Each view is one call into :mod:`chat.selectors` (reads) or
:mod:`chat.services` (writes). A conversation is reached only through
:func:`chat.selectors.access_conversation`, so someone else's conversation, or
a conversation that does not exist, is a 404 on every URL.

The chat itself (sending, streaming, regenerating, editing, switching
versions) goes over the WebSocket (:mod:`chat.consumers`); these views render
the page, the sidebar list, the settings, renaming, deleting and the exports,
and count the tokens of the composer's draft (:func:`count_tokens`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar, cast

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import redirect_to_login
from django.core.cache import cache
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.http import content_disposition_header, url_has_allowed_host_and_scheme
from django.utils.text import slugify
from django.views.decorators.http import require_GET, require_POST

from chat import frames, live, rendered, search, selectors, services, sessions_io
from chat.context import build_prompt
from chat.forms import ConversationSettingsForm, LoginForm, RenameForm
from chat.models import Conversation, Message
from chatsite import ratelimit
from chatsite.middleware import renew_session, session_exists
from inference import registry
from inference.types import ChatMessage, InferenceError

View = TypeVar("View", bound=Callable[..., HttpResponseBase])


def chat_view(view: View) -> View:
    """Make a view of the chat site: anonymous visitors are sent to the login
    page when ``CHATSITE_REQUIRE_LOGIN`` is on.

    An anonymous browser owns its conversations by its session key, which the
    WebSocket knows by the same cookie; the session is made only when the
    browser first sends a message (:func:`start_session`), so that visits,
    crawlers and probes leave nothing behind."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not request.user.is_authenticated and settings.CHATSITE_REQUIRE_LOGIN:
            return redirect_to_login(request.get_full_path())
        return view(request, *args, **kwargs)

    return cast(View, wrapper)


def _has_session(request: HttpRequest) -> bool:
    """Whether the browser has a stored session (a signed-in user has one)."""
    return bool(request.user.is_authenticated or session_exists(request.session))


@require_POST
@chat_view
def start_session(request: HttpRequest) -> JsonResponse:
    """Make the browser's session (and its cookie) before its first message:
    the page calls it, then opens the WebSocket, which needs one."""
    renew_session(request.session, create=True)
    return JsonResponse({"session": True})


def _owner(request: HttpRequest) -> dict[str, Any]:
    """The ``user`` and ``session_key`` arguments of the selectors (a cookie
    naming no stored session owns nothing)."""
    if request.user.is_authenticated or not session_exists(request.session):
        return {"user": request.user, "session_key": None}
    return {"user": request.user, "session_key": request.session.session_key}


def _conversation_or_404(request: HttpRequest, conversation_id: uuid.UUID) -> Conversation:
    try:
        return selectors.access_conversation(conversation_id=conversation_id, **_owner(request))
    except Conversation.DoesNotExist:
        raise Http404("No such conversation.") from None


def _wants_json(request: HttpRequest) -> bool:
    """Whether the page's script sent the form (it asks for JSON) rather than
    the browser (which then gets a redirect or a page)."""
    return request.headers.get("Accept", "").startswith("application/json")


def _next_url(request: HttpRequest, default: str) -> str:
    """The ``next`` field of a form when it is a path of this site, else ``default``."""
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return default


def _settings_form(conversation: Conversation | None) -> ConversationSettingsForm:
    if conversation is None:
        return ConversationSettingsForm(initial={"model": settings.CHATSITE_DEFAULT_MODEL})
    return ConversationSettingsForm(
        initial={
            "model": conversation.model_name,
            "system_prompt": conversation.system_prompt,
            "temperature": conversation.temperature,
            "max_tokens": conversation.max_tokens,
            "top_p": conversation.top_p,
            "top_k": conversation.top_k,
            "seed": conversation.seed,
        }
    )


def _sidebar(request: HttpRequest) -> dict[str, Any]:
    """The context of ``templates/chat/_conversation_list.html``: the
    conversations (``q``: those the search finds, with their snippets) under
    their headings. Constant queries, whatever their number."""
    query = request.GET.get("q", "")
    if query.strip():
        entries: list[tuple[Conversation, str]] = list(
            search.search_conversations(query=query, **_owner(request))
        )
    else:
        entries = [(conversation, "") for conversation in selectors.conversations_of(**_owner(request))]
    return {
        "conversations": [conversation for conversation, _ in entries],
        "conversation_groups": selectors.sidebar_groups(entries),
        "search": query,
    }


def _chat_page(
    request: HttpRequest,
    conversation: Conversation | None,
    *,
    settings_form: ConversationSettingsForm | None = None,
    status: int = 200,
) -> HttpResponse:
    """The chat page: the sidebar, and the shown branch of ``conversation``
    (None: an empty new chat)."""
    context: dict[str, Any] = {
        **_sidebar(request),
        "conversation": conversation,
        "entries": [],
        "view_starts_at": None,
        "settings_form": settings_form or _settings_form(conversation),
        "settings_open": settings_form is not None,
        "default_temperature": 0.8,
        "default_max_tokens": settings.CHATSITE_DEFAULT_MAX_TOKENS,
        "max_message_chars": settings.CHATSITE_MAX_MESSAGE_CHARS,
        "max_system_prompt_chars": settings.CHATSITE_MAX_SYSTEM_PROMPT_CHARS,
        "placeholder_id": uuid.UUID(int=0),
        "has_session": _has_session(request),
    }
    if conversation is not None:
        branch = selectors.branch_for_display(conversation)
        # In this request's own thread (Django gives each request one), never
        # the thread that serves the consumers' database calls.
        rendered.ensure_html_now([entry.message for entry in branch["entries"]])
        context.update(branch)
    return render(request, "chat/chat.html", context, status=status)


@require_GET
@chat_view
def home(request: HttpRequest) -> HttpResponse:
    """The newest conversation, or a new chat when there is none."""
    newest = selectors.conversations_of(**_owner(request)).first()
    if newest is None:
        return _chat_page(request, None)
    url = reverse("conversation", kwargs={"conversation_id": newest.pk})
    query = request.GET.urlencode()
    return redirect(f"{url}?{query}" if query else url)


@require_GET
@chat_view
def new_conversation(request: HttpRequest) -> HttpResponse:
    """An empty chat: the conversation is created by its first message."""
    return _chat_page(request, None)


@require_GET
@chat_view
def conversation(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    return _chat_page(request, _conversation_or_404(request, conversation_id))


@require_GET
@chat_view
def conversation_list(request: HttpRequest) -> HttpResponse:
    """The sidebar's list of conversations alone, for the live search."""
    return render(request, "chat/_conversation_list.html", _sidebar(request))


def _tell_pages(
    conversation: Conversation, to_owner: dict[str, Any], *, to_conversation: dict[str, Any] | None = None
) -> None:
    """Tell the owner's other pages (their sidebars) and the conversation's
    pages what changed (chat.live); a page that misses it sees it on its next load."""
    async_to_sync(live.post_to_owner)(live.group_of_owner(conversation), to_owner)
    if to_conversation is not None:
        async_to_sync(live.post_to_conversation)(conversation.pk, to_conversation)


@require_POST
@chat_view
def rename_conversation(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    conversation = _conversation_or_404(request, conversation_id)
    form = RenameForm(request.POST)
    if not form.is_valid():
        if _wants_json(request):
            return JsonResponse({"errors": form.errors.get_json_data()}, status=400)
        return HttpResponse(form.errors.as_text(), status=400, content_type="text/plain; charset=utf-8")
    services.do_rename_conversation(conversation=conversation, title=form.cleaned_data["title"])
    title = {"type": "title", "conversation": str(conversation.pk), "title": conversation.title}
    _tell_pages(conversation, {"type": "sidebar"}, to_conversation=title)
    if _wants_json(request):
        return JsonResponse({"id": str(conversation.pk), "title": conversation.title})
    return redirect(_next_url(request, reverse("conversation", kwargs={"conversation_id": conversation.pk})))


@require_POST
@chat_view
def delete_conversation(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    conversation = _conversation_or_404(request, conversation_id)
    own_url = reverse("conversation", kwargs={"conversation_id": conversation.pk})
    # A reply streaming in it stops first (its process keeps nothing then).
    async_to_sync(live.ask_runner)(conversation.pk, {"type": live.STOP})
    services.do_delete_conversation(conversation=conversation)
    _tell_pages(
        conversation,
        {"type": "sidebar"},
        to_conversation={"type": "deleted", "conversation": str(conversation_id)},
    )
    target = _next_url(request, reverse("home"))
    # The page of the deleted conversation is gone: go to the next newest.
    return redirect(reverse("home") if target.startswith(own_url) else target)


@require_POST
@chat_view
def pin_conversation(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """Pin (``pinned=1``) or unpin (``pinned=0``) a conversation: pinned
    ones head the sidebar."""
    conversation = _conversation_or_404(request, conversation_id)
    pinned = {"1": True, "0": False}.get(request.POST.get("pinned", ""))
    if pinned is None:
        message = "pinned is 1 (pin) or 0 (unpin)."
        if _wants_json(request):
            return JsonResponse({"errors": {"pinned": [{"message": message, "code": "invalid"}]}}, status=400)
        return HttpResponse(message, status=400, content_type="text/plain; charset=utf-8")
    services.do_set_pinned(conversation=conversation, pinned=pinned)
    _tell_pages(conversation, {"type": "sidebar"})
    if _wants_json(request):
        return JsonResponse({"id": str(conversation.pk), "pinned": conversation.pinned})
    return redirect(_next_url(request, reverse("conversation", kwargs={"conversation_id": conversation.pk})))


@require_POST
@chat_view
def conversation_settings(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """Save the model, system prompt, temperature, max tokens, top-p, top-k
    and seed; a bad value changes nothing and is shown next to its field."""
    conversation = _conversation_or_404(request, conversation_id)
    form = ConversationSettingsForm(request.POST)
    if form.is_valid():
        try:
            services.do_update_conversation_settings(
                conversation=conversation,
                model_name=form.cleaned_data["model"],
                system_prompt=form.cleaned_data["system_prompt"],
                temperature=form.cleaned_data["temperature"],
                max_tokens=form.cleaned_data["max_tokens"],
                top_p=form.cleaned_data["top_p"],
                top_k=form.cleaned_data["top_k"],
                seed=form.cleaned_data["seed"],
            )
        except ValueError as error:
            form.add_error(None, str(error))
    if _wants_json(request):
        if form.errors:
            return JsonResponse({"errors": form.errors.get_json_data()}, status=400)
        return JsonResponse({"saved": True})
    if form.errors:
        return _chat_page(request, conversation, settings_form=form, status=400)
    return redirect("conversation", conversation_id=conversation.pk)


def _download_name(conversation: Conversation, extension: str) -> str:
    return f"{slugify(conversation.title) or 'conversation'}-{str(conversation.pk)[:8]}.{extension}"


@require_GET
@chat_view
def export_markdown(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """The shown branch as a Markdown document."""
    conversation = _conversation_or_404(request, conversation_id)
    text = render_to_string("chat/export.md", selectors.branch_for_display(conversation))
    return HttpResponse(
        text,
        content_type="text/markdown; charset=utf-8",
        headers={"Content-Disposition": content_disposition_header(True, _download_name(conversation, "md"))},
    )


@require_GET
@chat_view
def export_json(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """The conversation, every branch of it, in the full sessions.json format."""
    conversation = _conversation_or_404(request, conversation_id)
    data = sessions_io.export_data(Conversation.objects.filter(pk=conversation.pk), format="full")
    return HttpResponse(
        sessions_io.dumps(data),
        content_type="application/json; charset=utf-8",
        headers={
            "Content-Disposition": content_disposition_header(True, _download_name(conversation, "json"))
        },
    )


class LoginView(auth_views.LoginView):
    """Django's login, which also gives the person the conversations they had
    in this browser before logging in."""

    template_name = "registration/login.html"
    redirect_authenticated_user = True
    form_class = LoginForm

    def form_valid(self, form: AuthenticationForm) -> HttpResponse:
        # Logging in gives the session a new key: remember the old one first.
        anonymous_key = self.request.session.session_key or ""
        response = super().form_valid(form)
        services.do_claim_session_conversations(session_key=anonymous_key, user=form.get_user())
        return response


# --- The composer's token counter ----------------------------------------------------
#
# POST /tokens {"conversation": id or null, "model": name, "draft": text,
# "system_prompt": text (a new chat's)} answers {"conversation_tokens",
# "draft_tokens", "context"}: the prompt a message with this draft would be
# sent with, counted with the model's own tokenizer and chat template,
# against the model's context window. The page asks 400 ms after typing
# stops, one request at a time.

# How long a conversation's count is kept. Its messages are part of the key,
# so a new message is a new key: the time only bounds what the cache holds.
HISTORY_COUNT_SECONDS = 600


class _Refused(Exception):
    """A token count the view refuses, with the form errors' JSON shape
    (``{"errors": {field: [{"message", "code"}]}}``, as ``static/js/chat/http.js`` reads it)."""

    def __init__(
        self, status: int, field: str, message: str, code: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.code = code
        self.retry_after = retry_after

    def response(self) -> JsonResponse:
        response = JsonResponse(
            {"errors": {self.field: [{"message": str(self), "code": self.code}]}}, status=self.status
        )
        if self.retry_after is not None:
            response["Retry-After"] = str(self.retry_after)
        return response


@dataclass(frozen=True)
class TokenQuestion:
    """What to count: the ``history`` a next message would be sent with
    (the system prompt and the earlier messages, as the chat template gets
    them), and the ``draft`` as that message (None when there is none)."""

    model: str
    history: tuple[ChatMessage, ...]
    draft: ChatMessage | None


def _token_count_limit(request: HttpRequest) -> ratelimit.Limit:
    """Counts per minute of a user, else a browser session, else an address
    (a new visitor has no session before its first message). Beside the
    frames of the WebSocket, with their budget, but counted apart: typing
    never uses up the frames that edit or switch."""
    if request.user.is_authenticated:
        who = f"user:{request.user.pk}"
    elif session_exists(request.session):
        who = f"session:{request.session.session_key}"
    else:
        who = f"address:{ratelimit.client_address(request)}"
    return ratelimit.Limit(f"{who}:token-counts", settings.CHATSITE_RATELIMIT_SESSION_FRAMES_PER_MINUTE, 0)


def _body_field(read: Callable[[], Any], field: str) -> Any:
    try:
        return read()
    except frames.FrameError as error:
        raise _Refused(400, field, str(error), error.code) from None


def _token_question(request: HttpRequest) -> TokenQuestion:
    """Check the request (who asks, how often, the body, the conversation's
    owner) and pick the messages to count. Reaches the database: call it
    through ``sync_to_async``. Raises :class:`_Refused`."""
    if not request.user.is_authenticated and settings.CHATSITE_REQUIRE_LOGIN:
        raise _Refused(403, "__all__", "Log in to use the chat.", "login_required")
    try:
        ratelimit.check_request([_token_count_limit(request)])
    except ratelimit.RateLimited as exc:
        raise _Refused(429, "__all__", exc.message, "rate_limited", exc.retry_after) from None
    # Room for a draft and a system prompt of the longest sizes, JSON escaping and the other fields.
    max_bytes = (settings.CHATSITE_MAX_MESSAGE_CHARS + settings.CHATSITE_MAX_SYSTEM_PROMPT_CHARS) * 6 + 4096
    if len(request.body) > max_bytes:
        raise _Refused(400, "__all__", f"The body is longer than {max_bytes} bytes.", "too_large")
    try:
        body = json.loads(request.body)
    except (ValueError, RecursionError) as exc:
        raise _Refused(400, "__all__", f"The body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise _Refused(400, "__all__", "The body is a JSON object.", "invalid")
    conversation_id = _body_field(lambda: frames.optional_uuid(body, "conversation"), "conversation")
    model = _body_field(lambda: frames.model_name(body), "model")
    draft = _body_field(
        lambda: frames.optional_text(body, "draft", settings.CHATSITE_MAX_MESSAGE_CHARS), "draft"
    )
    system_prompt = _body_field(
        lambda: frames.optional_text(body, "system_prompt", settings.CHATSITE_MAX_SYSTEM_PROMPT_CHARS),
        "system_prompt",
    )
    if conversation_id is None:
        # A new chat: its system prompt is the one typed in the settings panel.
        conversation = Conversation(
            model_name=model or settings.CHATSITE_DEFAULT_MODEL, system_prompt=system_prompt or ""
        )
        branch: list[Message] = []
    else:
        try:
            conversation = selectors.access_conversation(conversation_id=conversation_id, **_owner(request))
        except Conversation.DoesNotExist:
            raise _Refused(404, "conversation", "No such conversation.", "not_found") from None
        branch = selectors.shown_branch(conversation)
    # build_prompt picks the messages as it does for a reply (the system
    # prompt, the last chat.max_history_messages), with the draft as the
    # newest; every count is 0 here, so it trims nothing for the context:
    # the counter is there to show that the prompt would not fit.
    newest = Message(role=Message.Role.USER, content=draft or "-", status=Message.Status.COMPLETE)
    prompt = build_prompt(
        conversation=conversation,
        branch=[*branch, newest],
        max_messages=settings.CHATSITE_MAX_HISTORY_MESSAGES,
        context_size=1,
        max_tokens=0,
        count_tokens=lambda messages: 0,
    )
    return TokenQuestion(
        model=model or conversation.model_name,
        history=prompt.messages[:-1],
        draft=prompt.messages[-1] if draft else None,
    )


def count_question_tokens(question: TokenQuestion) -> dict[str, int]:
    """The counts of :func:`count_tokens`'s answer, with the model's
    tokenizer and chat template. Blocking (the first count loads the model):
    call it from a worker thread. The history's count is cached, so that
    each keystroke's question counts only once."""
    engine = registry.get_engine(question.model)
    history = list(question.history)
    digest = hashlib.blake2b(repr((question.model, history)).encode("utf-8"), digest_size=16).hexdigest()
    key = f"token-count:{digest}"
    conversation_tokens = cache.get(key)
    if conversation_tokens is None:
        conversation_tokens = engine.count_prompt_tokens(history) if history else 0
        cache.set(key, conversation_tokens, HISTORY_COUNT_SECONDS)
    draft_tokens = 0
    if question.draft is not None:
        draft_tokens = max(0, engine.count_prompt_tokens([*history, question.draft]) - conversation_tokens)
    return {"conversation_tokens": conversation_tokens, "draft_tokens": draft_tokens, "context": engine.n_ctx}


@require_POST
async def count_tokens(request: HttpRequest) -> JsonResponse:
    """The composer's counter: tokens of the conversation and of the draft
    against the model's context (see the comment above). A draft over
    ``chat.max_message_chars`` or a bad body is a 400 naming the field,
    someone else's conversation a 404, too many counts a 429. The count runs
    in a worker thread, off the event loop and off the database's thread."""
    try:
        question = await sync_to_async(_token_question)(request)
        counts = await asyncio.to_thread(count_question_tokens, question)
    except _Refused as refused:
        return refused.response()
    except InferenceError as error:
        return _Refused(503, "__all__", f"The model cannot count tokens now: {error}", error.kind).response()
    return JsonResponse(counts)
