"""Forms of the chat site: what the person may type into a conversation's
settings and its title, checked before :mod:`chat.services` is called."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import ValidationError
from django.core.validators import MaxLengthValidator
from django.http import HttpRequest

from chat.services import MAX_TOKENS_LIMIT, TITLE_MAX_LENGTH
from chatsite import ratelimit
from inference import registry


class ConversationSettingsForm(forms.Form):
    """The model and reply settings of one conversation.

    An empty temperature, max tokens, top-p or top-k means the model's
    default, an empty seed a random one for each reply. The ranges are the
    ones :func:`chat.services.do_update_conversation_settings` accepts, so
    that the person sees a message next to the field rather than a refusal.
    """

    model = forms.ChoiceField(choices=())
    # max_length is set from chat.max_system_prompt_chars when the form is made.
    system_prompt = forms.CharField(required=False, strip=False, widget=forms.Textarea)
    temperature = forms.FloatField(required=False, min_value=0, max_value=2)
    max_tokens = forms.IntegerField(required=False, min_value=1, max_value=MAX_TOKENS_LIMIT)
    # Greater than 0: checked in clean_top_p (min_value would allow 0).
    top_p = forms.FloatField(required=False, max_value=1)
    top_k = forms.IntegerField(required=False, min_value=0, max_value=2**31 - 1)
    seed = forms.IntegerField(required=False, min_value=0, max_value=2**32 - 1)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Read when the form is made: the configured models are settings.
        model_field = self.fields["model"]
        assert isinstance(model_field, forms.ChoiceField)
        model_field.choices = [(name, name) for name in registry.model_names()]
        prompt_field = self.fields["system_prompt"]
        assert isinstance(prompt_field, forms.CharField)
        limit = settings.CHATSITE_MAX_SYSTEM_PROMPT_CHARS
        prompt_field.max_length = limit
        prompt_field.validators.append(MaxLengthValidator(limit))
        prompt_field.widget.attrs["maxlength"] = str(limit)

    def clean_top_p(self) -> float | None:
        value: float | None = self.cleaned_data.get("top_p")
        if value is not None and value <= 0:
            raise ValidationError("Ensure this value is greater than 0.", code="min_value")
        return value


class RenameForm(forms.Form):
    title = forms.CharField(max_length=TITLE_MAX_LENGTH)


def _login_throttles() -> tuple[ratelimit.Throttle, ratelimit.Throttle]:
    window = settings.CHATSITE_LOGIN_WINDOW_SECONDS
    return (
        ratelimit.Throttle("login-user", settings.CHATSITE_LOGIN_FAILURES_PER_USER, window),
        ratelimit.Throttle("login-address", settings.CHATSITE_LOGIN_FAILURES_PER_ADDRESS, window),
    )


class ThrottledLogin:
    """Sign-in that refuses, without hashing the password, a user name or a
    client address with too many failed attempts in the window
    (``ratelimit.login_*``); failures are counted in the cache, so every
    process sharing it agrees. Mixed into Django's login forms."""

    request: HttpRequest | None
    cleaned_data: dict[str, Any]

    def clean(self) -> dict[str, Any]:
        username = str(self.cleaned_data.get("username") or "").strip().lower()
        address = ratelimit.client_address(self.request) if self.request is not None else "unknown"
        by_user, by_address = _login_throttles()
        waits = [by_user.retry_after([username]), by_address.retry_after([address])]
        wait = max((w for w in waits if w is not None), default=None)
        if wait is not None:
            raise ValidationError(
                f"Too many failed sign-ins for this account or from this address. Try again in {wait} s.",
                code="throttled",
            )
        try:
            cleaned: dict[str, Any] = super().clean()  # type: ignore[misc]
        except ValidationError:
            by_user.record_failure([username])
            by_address.record_failure([address])
            raise
        return cleaned


class LoginForm(ThrottledLogin, AuthenticationForm):
    """The site's sign-in form."""


class AdminLoginForm(ThrottledLogin, AdminAuthenticationForm):
    """The admin's sign-in form."""
