"""Forms of the chat site: what the person may type into a conversation's
settings and its title, checked before :mod:`chat.services` is called."""

from __future__ import annotations

from typing import Any

from django import forms

from chat.services import MAX_TOKENS_LIMIT, TITLE_MAX_LENGTH
from inference import registry


class ConversationSettingsForm(forms.Form):
    """The model and reply settings of one conversation.

    An empty temperature or max tokens means the model's default. The ranges
    are the ones :func:`chat.services.do_update_conversation_settings` accepts,
    so that the person sees a message next to the field rather than a refusal.
    """

    model = forms.ChoiceField(choices=())
    system_prompt = forms.CharField(required=False, strip=False, widget=forms.Textarea)
    temperature = forms.FloatField(required=False, min_value=0, max_value=2)
    max_tokens = forms.IntegerField(required=False, min_value=1, max_value=MAX_TOKENS_LIMIT)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Read when the form is made: the configured models are settings.
        model_field = self.fields["model"]
        assert isinstance(model_field, forms.ChoiceField)
        model_field.choices = [(name, name) for name in registry.model_names()]


class RenameForm(forms.Form):
    title = forms.CharField(max_length=TITLE_MAX_LENGTH)
