"""Views of the chat site.

Each view is one call into :mod:`chat.selectors` (reads) or
:mod:`chat.services` (writes). A conversation is reached only through
:func:`chat.selectors.access_conversation`, so someone else's conversation, or
a conversation that does not exist, is a 404 on every URL.

The chat itself (sending, streaming, regenerating, editing, switching
versions) goes over the WebSocket (:mod:`chat.consumers`); these views render
the page, the sidebar list, the settings, renaming, deleting and the exports.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import redirect_to_login
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.http import content_disposition_header, url_has_allowed_host_and_scheme
from django.utils.text import slugify
from django.views.decorators.http import require_GET, require_POST

from chat import rendered, selectors, services, sessions_io
from chat.forms import ConversationSettingsForm, LoginForm, RenameForm
from chat.models import Conversation
from chatsite.middleware import renew_session, session_exists

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
        }
    )


def _chat_page(
    request: HttpRequest,
    conversation: Conversation | None,
    *,
    settings_form: ConversationSettingsForm | None = None,
    status: int = 200,
) -> HttpResponse:
    """The chat page: the sidebar, and the shown branch of ``conversation``
    (None: an empty new chat)."""
    search = request.GET.get("q", "")
    context: dict[str, Any] = {
        "conversation": conversation,
        "entries": [],
        "view_starts_at": None,
        "conversations": selectors.conversations_of(search=search, **_owner(request)),
        "search": search,
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
    search = request.GET.get("q", "")
    conversations = selectors.conversations_of(search=search, **_owner(request))
    return render(request, "chat/_conversation_list.html", {"conversations": conversations, "search": search})


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
    if _wants_json(request):
        return JsonResponse({"id": str(conversation.pk), "title": conversation.title})
    return redirect(_next_url(request, reverse("conversation", kwargs={"conversation_id": conversation.pk})))


@require_POST
@chat_view
def delete_conversation(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    conversation = _conversation_or_404(request, conversation_id)
    own_url = reverse("conversation", kwargs={"conversation_id": conversation.pk})
    services.do_delete_conversation(conversation=conversation)
    target = _next_url(request, reverse("home"))
    # The page of the deleted conversation is gone: go to the next newest.
    return redirect(reverse("home") if target.startswith(own_url) else target)


@require_POST
@chat_view
def conversation_settings(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """Save the model, system prompt, temperature and max tokens; a bad value
    changes nothing and is shown next to its field."""
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
