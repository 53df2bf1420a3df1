"""Sampler chains: one per sequence, built from a request's :class:`SamplingParams`.

The chain is the one llama-cpp-python's ``Llama.generate`` builds (penalties
over the last 64 generated tokens, the grammar, then greedy, or top-k,
typical 1.0, top-p, min-p, temperature and a seeded draw), so replies read as
they did before the engine was batched; the penalties are applied by
:class:`Penalties` with llama.cpp's arithmetic, to the same effect, faster.
Prompt tokens are not fed to the penalties, as before. Worker thread only,
except the grammar helpers (from :mod:`inference.grammars`, re-exported here).

With :attr:`SamplingParams.logprobs` set, each :meth:`SamplerChain.sample`
also records the token's log probability (:attr:`SamplerChain.last_logprobs`)
over the logits the chain drew from: after the penalties and the grammar's
mask, before temperature and the truncating samplers: the model's
distribution, as OpenAI reports it (llama-server's default is the softmax of
the raw logits, before its penalties and grammar; its ``post_sampling_probs``
the truncated one). Without it nothing is computed.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import time

import llama_cpp
import numpy as np
import numpy.typing as npt

from inference.grammars import check_grammar, grammar_for_json_schema, json_object_grammar
from inference.logprobs import SampledLogprobs, logprobs_of
from inference.types import InvalidRequest, SamplingParams

__all__ = [
    "GRAMMAR_TOKEN_BUDGET_SECONDS",
    "PENALTY_LAST_N",
    "Penalties",
    "SamplerChain",
    "grammar_for_json_schema",
    "json_object_grammar",
]

logger = logging.getLogger(__name__)

# llama-cpp-python's last_n_tokens_size: the window of the repeat penalties.
PENALTY_LAST_N = 64
# The grammar's share of one token, past which the reply ends. The worst
# tokens of the schemas inference.grammars accepts took 70 ms on this 2-core
# machine, 120 ms while other tests ran (python -m bench.grammar); a grammar
# that takes 1 s escaped the checks (an ambiguous recursive GBNF grammar, which
# they do not analyse, grew from 17 to 83 to 534 ms over three tokens) and
# would hold every other reply of the engine back as long.
GRAMMAR_TOKEN_BUDGET_SECONDS = 1.0
# A llama_token_data array as numpy sees it (llama_token id, float logit, float p).
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class SamplerChain:
    """A ``llama_sampler`` chain for one sequence; free it with :meth:`free`.

    The grammar is checked (:func:`inference.grammars.check_grammar`) and then
    compiled alone, so that one that does not parse is an
    :class:`InvalidRequest` (llama.cpp would add it to a chain as a null
    pointer and crash on the first token). It is applied before the chain on
    each token, as a chain would, but watched: see :meth:`sample`.
    """

    def __init__(self, params: SamplingParams, vocab: llama_cpp.llama_vocab_p) -> None:
        self._grammar = None
        # Why the grammar ended the reply early, or None (see sample).
        self.grammar_gave_up: str | None = None
        # Alternatives to record with each token; None: no logprobs at all.
        self._top_logprobs = params.logprobs
        # The last sampled token's logprobs (None without logprobs, or after
        # the grammar gave up).
        self.last_logprobs: SampledLogprobs | None = None
        if params.grammar is not None:
            check_grammar(params.grammar)
            self._end_token = _end_of_generation_token(vocab)
            self._grammar = llama_cpp.llama_sampler_init_grammar(
                vocab, params.grammar.encode("utf-8"), b"root"
            )
            if not self._grammar:
                raise InvalidRequest("the grammar (or the JSON schema it was made from) cannot be used")
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(chain_params)
        self._penalties = Penalties(params) if Penalties.wanted(params) else None
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        if self._grammar is not None:
            assert ctypes.sizeof(llama_cpp.llama_token_data) == _TOKEN_DATA.itemsize
            self._ids = np.arange(self._n_vocab, dtype=np.int32)
            self._candidates = np.zeros(self._n_vocab, dtype=_TOKEN_DATA)
            self._candidates_pointer = self._candidates.ctypes.data_as(llama_cpp.llama_token_data_p)
            self._single = np.zeros(1, dtype=_TOKEN_DATA)
            self._single_pointer = self._single.ctypes.data_as(llama_cpp.llama_token_data_p)
        add = llama_cpp.llama_sampler_chain_add
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
        to the penalties and the grammar.

        With a grammar, the token is the end of generation once the grammar
        allows no token (llama.cpp would abort the process on accepting any:
        a grammar needing a character no token has), or once one token's
        grammar work took longer than :data:`GRAMMAR_TOKEN_BUDGET_SECONDS`;
        :attr:`grammar_gave_up` then says which.

        With logprobs asked for, :attr:`last_logprobs` is then the token's.
        """
        self.last_logprobs = None
        top = self._top_logprobs
        logits = None
        if self._penalties is not None or top is not None:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context, index), (self._n_vocab,))
            if self._penalties is not None:
                self._penalties.apply(logits)
        if self._grammar is None:
            # The chain copies the logits into candidates of its own: these stay as they are.
            token = int(llama_cpp.llama_sampler_sample(self._chain, context, index))
            if top is not None and logits is not None:
                self.last_logprobs = logprobs_of(logits, token, top)
        elif self.grammar_gave_up is not None:
            return self._end_token
        else:
            token = self._sample_with_grammar(context, index)
        if self._penalties is not None:
            self._penalties.accept(token)
        return token

    def _fill_candidates(
        self, context: llama_cpp.llama_context_p, index: int
    ) -> llama_cpp.llama_token_data_array:
        candidates = self._candidates
        candidates["id"] = self._ids
        candidates["logit"] = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(context, index), (self._n_vocab,)
        )
        candidates["p"] = 0
        return llama_cpp.llama_token_data_array(self._candidates_pointer, self._n_vocab, -1, False)

    def _sample_with_grammar(self, context: llama_cpp.llama_context_p, index: int) -> int:
        """``llama_sampler_sample`` (the candidates, the grammar, the chain,
        then accepting the token) with the grammar's outcome checked.

        As llama.cpp's common sampler does, the chain draws first and the
        grammar is asked about that one token; only when it refuses it is the
        whole vocabulary masked and the draw made again. Testing the
        grammar's parse stacks against all 49,152 tokens is most of a
        constrained token's cost (python -m bench.tools: 7.6 ms of 19.5 ms
        per token for one stream, 3.5 times a plain reply's step with 8),
        and a model that follows the format mostly draws an allowed token.
        Greedy, the token is the same either way. With logprobs, the masked
        distribution is needed, so the whole vocabulary is masked first."""
        array = self._fill_candidates(context, index)
        started = time.perf_counter()
        top = self._top_logprobs
        if top is None:
            llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(array))
            token = int(array.data[array.selected].id)
            single = self._single
            single["id"] = token
            single["logit"] = 0.0
            single["p"] = 0.0
            one = llama_cpp.llama_token_data_array(self._single_pointer, 1, -1, False)
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(one))
            if single["logit"][0] != -np.inf:
                llama_cpp.llama_sampler_accept(self._grammar, token)
                llama_cpp.llama_sampler_accept(self._chain, token)
                return token
            array = self._fill_candidates(context, index)
        candidates = self._candidates
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        if candidates["logit"].max() == -np.inf:
            return self._give_up("the grammar allows no further token")
        # The chain scales and reorders the candidates in place: keep the masked logits.
        masked = candidates["logit"].copy() if top is not None else None
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(array))
        token = int(array.data[array.selected].id)
        if top is not None and masked is not None:
            self.last_logprobs = logprobs_of(masked, token, top)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        took = time.perf_counter() - started
        if took > GRAMMAR_TOKEN_BUDGET_SECONDS:
            self._give_up(f"one token's grammar work took {took:.1f} s")
        return token

    def _give_up(self, reason: str) -> int:
        logger.warning("a grammar-constrained reply ends early: %s", reason)
        self.grammar_gave_up = reason
        return self._end_token

    def free(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None


def _end_of_generation_token(vocab: llama_cpp.llama_vocab_p) -> int:
    """The token that ends a reply (end of sequence, else end of turn)."""
    for token in (llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)):
        if token >= 0 and llama_cpp.llama_vocab_is_eog(vocab, token):
            return int(token)
    raise InvalidRequest("this model has no end-of-generation token, so it cannot follow a grammar safely")


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
