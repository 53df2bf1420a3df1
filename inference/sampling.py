"""Sampler chains: one per sequence, built from a request's :class:`SamplingParams`.

The chain is the one llama-cpp-python's ``Llama.generate`` builds (penalties
over the last 64 generated tokens, the grammar, then greedy, or top-k,
typical 1.0, top-p, min-p, temperature and a seeded draw), so replies read as
they did before the engine was batched. Prompt tokens are not fed to the
penalties, as before. Worker thread only, except the grammar helpers.
"""

from __future__ import annotations

import json
import os

import llama_cpp

from inference.types import InvalidRequest, SamplingParams

# llama-cpp-python's last_n_tokens_size: the window of the repeat penalties.
PENALTY_LAST_N = 64


def json_object_grammar() -> str:
    """The GBNF grammar of any JSON object (OpenAI's ``json_object`` format)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


def grammar_for_json_schema(schema: object) -> str:
    """The GBNF grammar of a JSON schema, through llama.cpp's converter.

    Raises :class:`InvalidRequest` for a schema it cannot convert (the
    converter supports most of JSON Schema, not all of it).
    """
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises many kinds on schemas it does not support
        raise InvalidRequest(f"the JSON schema cannot be turned into a grammar: {exc}") from None


class SamplerChain:
    """A ``llama_sampler`` chain for one sequence; free it with :meth:`free`.

    Raises :class:`InvalidRequest` when the grammar does not parse: llama.cpp
    adds such a grammar to a chain as a null pointer and crashes on the first
    token, so it is built alone first.
    """

    def __init__(self, params: SamplingParams, vocab: llama_cpp.llama_vocab_p) -> None:
        grammar = None
        if params.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode("utf-8"), b"root")
            if not grammar:
                raise InvalidRequest("the grammar (or the JSON schema it was made from) cannot be used")
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(chain_params)
        add = llama_cpp.llama_sampler_chain_add
        add(
            self._chain,
            llama_cpp.llama_sampler_init_penalties(
                PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
            ),
        )
        if grammar is not None:
            add(self._chain, grammar)  # the chain owns it from here
        if params.temperature == 0:
            add(self._chain, llama_cpp.llama_sampler_init_greedy())
        else:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4))
            add(self._chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
            add(self._chain, llama_cpp.llama_sampler_init_typical(1.0, 1))
            add(self._chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(self._chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(self._chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            add(self._chain, llama_cpp.llama_sampler_init_dist(seed))

    def sample(self, context: llama_cpp.llama_context_p, index: int) -> int:
        """The next token from the logits at batch ``index``; llama.cpp also
        feeds it to the penalties and the grammar."""
        return int(llama_cpp.llama_sampler_sample(self._chain, context, index))

    def free(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
