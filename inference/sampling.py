"""Sampler chains: one per sequence, built from a request's :class:`SamplingParams`.

The chain is the one llama-cpp-python's ``Llama.generate`` builds (penalties
over the last 64 generated tokens, the grammar, then greedy, or top-k,
typical 1.0, top-p, min-p, temperature and a seeded draw), so replies read as
they did before the engine was batched; the penalties are applied by
:class:`Penalties` with llama.cpp's arithmetic, to the same effect, faster.
Prompt tokens are not fed to the penalties, as before. Worker thread only,
except the grammar helpers.
"""

from __future__ import annotations

import collections
import json
import os

import llama_cpp
import numpy as np
import numpy.typing as npt

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
        self._penalties = Penalties(params) if Penalties.wanted(params) else None
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        add = llama_cpp.llama_sampler_chain_add
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
        """The next token from the logits at batch ``index``; it is also fed
        to the penalties and (by llama.cpp) the grammar."""
        if self._penalties is not None:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context, index), (self._n_vocab,))
            self._penalties.apply(logits)
        token = int(llama_cpp.llama_sampler_sample(self._chain, context, index))
        if self._penalties is not None:
            self._penalties.accept(token)
        return token

    def free(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


class Penalties:
    """Repeat, frequency and presence penalties over the last
    :data:`PENALTY_LAST_N` generated tokens, applied to the logits in place.

    The arithmetic is llama.cpp's penalties sampler's, in float32, but only
    the logits of tokens in the window are touched: llama.cpp's sampler looks
    every one of the vocabulary's 49,152 tokens up in a hash map, which took
    0.36 ms a token, 6% of a decode step of the bundled model.
    """

    @staticmethod
    def wanted(params: SamplingParams) -> bool:
        return not (
            params.repeat_penalty == 1.0
            and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0
        )

    def __init__(self, params: SamplingParams) -> None:
        self.repeat = np.float32(params.repeat_penalty)
        self.frequency = np.float32(params.frequency_penalty)
        self.presence = np.float32(params.presence_penalty)
        self.window: collections.deque[int] = collections.deque()
        self.counts: collections.Counter[int] = collections.Counter()

    def apply(self, logits: npt.NDArray[np.float32]) -> None:
        if not self.counts:
            return
        tokens = np.fromiter(self.counts.keys(), dtype=np.intc, count=len(self.counts))
        counts = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
        values = logits[tokens]
        values = np.where(values <= 0, values * self.repeat, values / self.repeat)
        values -= counts * self.frequency + self.presence
        logits[tokens] = values

    def accept(self, token: int) -> None:
        self.window.append(token)
        self.counts[token] += 1
        if len(self.window) > PENALTY_LAST_N:
            old = self.window.popleft()
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]
