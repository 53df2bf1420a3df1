"""The llama.cpp glue: every call the engine makes into llama-cpp-python's
low-level bindings, in one place.

Threading: a :class:`Context` and the :class:`Batch` fed to it belong to the
engine's worker thread; nothing here locks. :meth:`Model.tokenize` and the
other vocabulary reads only read what llama.cpp never changes after loading,
so they may run on any thread while the model is loaded.

The high-level ``llama_cpp.Llama`` is not used for decoding: it owns one
sequence and one sampler, where the batched engine needs one context with many
sequences on a shared KV cache and a sampler chain per sequence.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import _internals, _logger

# A sequence's saved KV state.
KvState = npt.NDArray[np.uint8]


def _bytes_pointer(array: KvState) -> ctypes._Pointer[ctypes.c_uint8]:
    assert array.flags.c_contiguous
    return array.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


# C's strlen(const char *) as llama.cpp's abort callback, bool (*)(void *):
# see Context.set_abort_flag. Its size_t result of 0 or 1 reads as the bool.
# (CDLL(None) is the running program and its C library: Linux and macOS.)
_STRLEN_AS_ABORT_CALLBACK = ctypes.cast(ctypes.CDLL(None).strlen, llama_cpp.ggml_abort_callback)

# llama-cpp-python prints every llama.cpp log line (the context's settings, each
# state restored) unless told otherwise; keep errors only, as Llama(verbose=False) did.
_logger.set_verbose(False)


@functools.cache
def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "not installed"


@functools.cache
def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python build can put layers on a GPU."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def gpu_layers_for(setting: int | str, *, offload_supported: bool) -> int:
    """llama.cpp's ``n_gpu_layers`` for a model's ``gpu_layers`` setting:
    every layer (-1) for "auto" on a GPU build, the number asked for otherwise,
    and none on a build without GPU offload."""
    if not offload_supported:
        return 0
    if setting == "auto":
        return -1
    assert isinstance(setting, int)
    return setting


class Model:
    """Loaded weights and their vocabulary (tokenizer, token pieces, chat template)."""

    def __init__(self, path: str, *, n_gpu_layers: int) -> None:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers
        self._model = _internals.LlamaModel(path_model=path, params=params, verbose=False)
        self.pointer = self._model.model
        self.vocab = self._model.vocab
        self._buffer = ctypes.create_string_buffer(64)
        self.metadata: dict[str, str] = self._model.metadata()
        self.n_ctx_train = int(self._model.n_ctx_train())

    def tokenize(self, text: bytes, *, add_bos: bool, special: bool) -> list[int]:
        return list(self._model.tokenize(text, add_bos, special))

    def token_bos(self) -> int:
        return int(self._model.token_bos())

    def token_eos(self) -> int:
        return int(self._model.token_eos())

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as nothing).

        llama-cpp-python's own ``detokenize`` uses a 32-byte buffer and drops
        longer pieces (runs of spaces in code, Markdown rules); this asks again
        with the size llama.cpp says it needs. Worker thread only (one buffer).
        """
        size = llama_cpp.llama_token_to_piece(self.vocab, token, self._buffer, len(self._buffer), 0, False)
        if size < 0:
            self._buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(
                self.vocab, token, self._buffer, len(self._buffer), 0, False
            )
        return self._buffer.raw[:size]

    def token_text(self, token: int) -> str:
        if token == -1:
            return ""
        return str(llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace"))

    def close(self) -> None:
        self._model.close()  # type: ignore[no-untyped-call]


class Batch:
    """A ``llama_batch`` the engine refills every step: one token per entry,
    each of one sequence."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0

    def add(self, token: int, position: int, sequence: int, *, logits: bool) -> int:
        """Append one token; returns its index (where its logits will be)."""
        i = self.n_tokens
        assert i < self.capacity
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = position
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = sequence
        batch.logits[i] = logits
        self.n_tokens = i + 1
        return i

    @property
    def native(self) -> llama_cpp.llama_batch:
        self._batch.n_tokens = self.n_tokens
        batch: llama_cpp.llama_batch = self._batch
        return batch

    def free(self) -> None:
        llama_cpp.llama_batch_free(self._batch)


class Context:
    """One llama.cpp context holding ``n_sequences`` sequences, each of up to
    ``n_ctx_per_sequence`` positions, each in a KV stream of its own.

    Separate streams (llama.cpp's default, and llama-server's) keep a
    sequence's attention to its own cells: on one unified cache every token
    attends over the cells of every sequence, so a single stream decoded beside
    slots holding long cached conversations ran at a third of its speed (48
    against 154 tokens/s). The price is that llama.cpp evaluates a batch in
    micro-batches of consecutive sequence ids only, so the engine orders each
    batch by sequence id and keeps its running sequences adjacent.

    Its ``copy``, ``remove``, ``state_of`` and ``restore`` are the KV store the
    engine's scheduler works on (:class:`inference.scheduler.KvStore`).
    """

    def __init__(
        self,
        model: Model,
        *,
        n_ctx_per_sequence: int,
        n_sequences: int,
        n_batch: int,
        n_threads: int,
    ) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_per_sequence * n_sequences
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_sequences
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.kv_unified = False
        params.no_perf = True
        pointer = llama_cpp.llama_init_from_model(model.pointer, params)
        if not pointer:
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self.pointer = pointer
        self.memory = llama_cpp.llama_get_memory(pointer)
        self.n_ctx_per_sequence = n_ctx_per_sequence
        self.n_sequences = n_sequences
        # The abort flag: a NUL-terminated byte string that is empty until
        # an abort is wanted (see set_abort_flag).
        self._abort_flag = ctypes.create_string_buffer(2)
        llama_cpp.llama_set_abort_callback(
            pointer, _STRLEN_AS_ABORT_CALLBACK, ctypes.cast(self._abort_flag, ctypes.c_void_p)
        )

    def decode(self, batch: Batch) -> int:
        """llama.cpp's status: 0 done, 1 no room in the KV cache, 2 aborted,
        < 0 error. After an abort or an error the micro-batches llama.cpp
        finished stay in the cache (only the failed one is removed): the
        caller removes what it does not count as evaluated."""
        return int(llama_cpp.llama_decode(self.pointer, batch.native))

    def set_abort_flag(self, abort: bool) -> None:
        """Ask llama.cpp to abort the decode in progress (or the next one) at
        its next graph node; any thread may call it. ``decode`` then returns 2.

        llama.cpp calls its abort callback from its compute thread after every
        graph node, hundreds of times a decode. A Python callback would take
        the GIL each time and wait behind the event loop (it stretched 150 ms
        prompt chunks to 500 ms), so the callback is C's ``strlen`` reading
        this context's flag: an empty string is false, one byte is true.
        """
        self._abort_flag[0] = b"\x01" if abort else b"\x00"

    def remove(self, sequence: int, start: int, end: int = -1) -> None:
        """Drop a sequence's positions ``[start, end)`` (-1: to its end)."""
        llama_cpp.llama_memory_seq_rm(self.memory, sequence, start, end)

    def copy(self, source: int, target: int, end: int) -> None:
        """Give ``target`` the positions ``[0, end)`` of ``source``.

        Between separate KV streams llama.cpp copies whole streams only (a
        memory copy of the buffers, some milliseconds), so the whole of
        ``source`` is copied and the rest trimmed.
        """
        llama_cpp.llama_memory_seq_cp(self.memory, source, target, -1, -1)
        # Copy now rather than at the next decode, so that the target's state
        # may be read (saved to the RAM cache) before then. (Deprecated in
        # later llama.cpp; revisit with the pin.)
        llama_cpp.llama_kv_self_update(self.pointer)
        self.remove(target, end)

    def state_of(self, sequence: int) -> KvState:
        """A sequence's KV state, to restore later with :meth:`restore`.

        llama.cpp writes it straight into an uninitialised array, which is
        kept as it is: a zeroed buffer and a copy to ``bytes`` made saving a
        1,500-token state take four passes over its 35 MB instead of one,
        in the path of the request that needed the slot.
        """
        size = llama_cpp.llama_state_seq_get_size(self.pointer, sequence)
        buffer = np.empty(size, dtype=np.uint8)
        written = llama_cpp.llama_state_seq_get_data(self.pointer, _bytes_pointer(buffer), size, sequence)
        return buffer[:written]

    def restore(self, sequence: int, state: KvState) -> bool:
        """Put a saved state into an (emptied) sequence; False if llama.cpp
        refused it (no room in the cache)."""
        self.remove(sequence, 0)
        return bool(
            llama_cpp.llama_state_seq_set_data(self.pointer, _bytes_pointer(state), state.nbytes, sequence)
        )

    def close(self) -> None:
        llama_cpp.llama_free(self.pointer)
