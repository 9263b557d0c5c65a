"""The one module that calls llama.cpp: load a GGUF, tokenize, decode a batch, free KV cells.

Everything else in the engine sees plain Python and numpy. The batch arrays are numpy
buffers owned here and handed to `llama_decode` by pointer, so filling a batch is a few
vectorised copies, not a Python loop per token.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import warnings
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import llguidance
import llguidance.llamacpp
import numpy as np
import numpy.typing as npt

from modelyard.engine.compute_thread import on_compute_thread
from modelyard.errors import ModelyardError

_backend_lock = threading.Lock()
_backend_ready = False


class RunnerError(ModelyardError, RuntimeError):
    """llama.cpp refused to load the model or to decode a batch."""


class DecodeInterrupted(ModelyardError, RuntimeError):
    """`LlamaRunner.interrupt` stopped a decode; nothing of its batch was kept."""


_libc = ctypes.CDLL(None)
_READ_FLAG = llama_cpp.ggml_abort_callback(
    ctypes.cast(_libc.strlen, ctypes.c_void_p).value or 0)
"""The abort callback llama.cpp's CPU backend calls between graph nodes, from its compute
thread: C's `strlen` over a two-byte buffer {flag, 0}, which returns 1 (abort) once the
flag byte is set and 0 otherwise. A Python callback would take the GIL at every node of
every step; this reads one byte and takes no lock. (The return is 0 or 1 in the whole
register, so it reads as a C `bool` on every ABI.)"""


KV_CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
"""The KV cache number formats offered, as ggml types (keys and values alike)."""


@dataclass(frozen=True)
class RunnerConfig:
    model_path: Path
    n_seq_max: int
    n_ctx: int
    """Total KV cells across all sequences."""
    n_batch: int
    """Most tokens one `decode` call may carry."""
    threads: int = 0
    gpu_layers: int = 0
    flash_attention: bool = True
    kv_cache_type: str = "f16"
    """The KV cache's number format, a key of `KV_CACHE_TYPES` ("q8_0" needs flash attention)."""


@dataclass(frozen=True)
class BatchItem:
    slot: int
    start: int
    tokens: Seq[int]
    want_logits: bool
    num_logits: int = 1
    """With `want_logits`: how many of the last tokens get a row of logits (a decode token
    with draft tokens after it needs one per token to verify them)."""


def model_params(gpu_layers: int) -> llama_cpp.llama_model_params:
    """Model load parameters.

    `use_extra_bufts` is off on purpose: llama.cpp's weight repacking for extra CPU buffer
    types (AMX and friends) segfaults inside `llama_decode` on AMX machines in this
    llama.cpp release, and repacking buys nothing measurable for these small quantised
    models. tests/engine/test_runner.py guards this.
    """
    params: llama_cpp.llama_model_params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = gpu_layers
    params.use_extra_bufts = False
    return params


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_silent_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


_INTERRUPT_ERRORS = (b"failed with error 1\n", b"compute status: 1\n", b"ret = 2\n")
"""The ends of the lines llama.cpp logs as errors for a decode `interrupt` stopped
(GGML_STATUS_ABORTED is 1, and llama_decode returns 2 for it): not errors here."""


def _log_errors_only(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line.
    verbose = bool(os.environ.get("MODELYARD_LLAMA_LOG"))
    if verbose or (level == 4 and not text.endswith(_INTERRUPT_ERRORS)):
        sys.stderr.write(text.decode("utf-8", "replace"))


_silent_log = llama_cpp.llama_log_callback(_log_errors_only)


class LlamaRunner:
    def __init__(self, config: RunnerConfig) -> None:
        _init_backend()
        self.config = config
        kv_type = KV_CACHE_TYPES.get(config.kv_cache_type)
        if kv_type is None:
            raise RunnerError(f"unknown KV cache type {config.kv_cache_type!r} "
                              f"(one of {', '.join(KV_CACHE_TYPES)})")
        if kv_type != llama_cpp.GGML_TYPE_F16 and not config.flash_attention:
            raise RunnerError(f"a {config.kv_cache_type} KV cache needs flash attention")
        threads = config.threads or (os.cpu_count() or 1)
        self._model = llama_cpp.llama_model_load_from_file(
            str(config.model_path).encode(), model_params(config.gpu_layers)
        )
        if not self._model:
            raise RunnerError(f"llama.cpp could not load the model at {config.model_path} "
                              f"(not a complete GGUF file, or not enough memory)")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = config.n_ctx
        params.n_batch = config.n_batch
        params.n_ubatch = min(config.n_batch, 512)
        params.n_seq_max = config.n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads
        # One unified KV stream: a batch mixing decode tokens and prefill chunks runs as one
        # ubatch, and prefix copies between slots share cells instead of copying them. (With
        # a stream per slot, llama.cpp splits such batches and its cost grows with the
        # highest slot index.) Every token attends over the used range of the cache, so
        # the scheduler bounds the cells free slots keep (`max_cached_cells`).
        params.kv_unified = True
        params.flash_attn_type = 1 if config.flash_attention else 0
        params.type_k = params.type_v = kv_type
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise RunnerError("llama.cpp could not create a context (out of memory?)")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._model))
        self.eog_ids = frozenset(
            t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)
        )
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._allocate_batch(config.n_batch, config.n_seq_max)
        self._piece_cache: dict[int, bytes] = {}
        self._interrupt_flag = ctypes.create_string_buffer(2)
        llama_cpp.llama_set_abort_callback(self._ctx, _READ_FLAG,
                                           ctypes.c_void_p(ctypes.addressof(self._interrupt_flag)))

    # -- vocabulary ----------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, special: bool = True) -> list[int]:
        """`special`: control tokens' text becomes those tokens (template markup); False
        keeps it text (what a client wrote)."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity,
                                     add_special, special)
        if n < 0:
            capacity = -n
            buffer = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity,
                                         add_special, special)
        return list(buffer[:n])

    def control_token_texts(self) -> list[str]:
        """The texts that tokenize to a control (or unknown) token only when special tokens
        are parsed: `<|im_start|>`, `<|endoftext|>` ..."""
        mask = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        texts = []
        for token in range(self.n_vocab):
            if llama_cpp.llama_vocab_get_attr(self._vocab, token) & mask:
                raw = llama_cpp.llama_vocab_get_text(self._vocab, token)
                if raw:
                    texts.append(raw.decode("utf-8", "replace"))
        return texts

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for; special tokens (end of turn and such) give b''."""
        cached = self._piece_cache.get(token)
        if cached is None:
            buffer = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
            if n < 0:
                buffer = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -n, 0, False)
            cached = buffer.raw[:n]
            self._piece_cache[token] = cached
        return cached

    def token_text(self, token: int | None) -> str:
        """A special token's text as templates write it (e.g. the BOS token), '' if none."""
        if token is None or token < 0:
            return ""
        buffer = ctypes.create_string_buffer(128)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 128, 0, True)
        return buffer.raw[: max(n, 0)].decode("utf-8", "replace")

    @property
    def bos_id(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self._vocab))

    @property
    def eos_id(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self._vocab))

    def fim_tokens(self) -> tuple[int, int, int] | None:
        """The model's fill-in-the-middle tokens (prefix, suffix, middle), if it has them."""
        ids = (llama_cpp.llama_vocab_fim_pre(self._vocab),
               llama_cpp.llama_vocab_fim_suf(self._vocab),
               llama_cpp.llama_vocab_fim_mid(self._vocab))
        if any(token < 0 for token in ids):
            return None
        return int(ids[0]), int(ids[1]), int(ids[2])

    def grammar_tokenizer(self) -> llguidance.LLTokenizer:
        """The vocabulary as llguidance needs it for constrained decoding (about a second)."""
        with warnings.catch_warnings():
            # llguidance reads token attributes through a name llama-cpp-python deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            return llguidance.llamacpp.lltokenizer_from_vocab(self._vocab)

    def chat_template(self) -> str | None:
        template = llama_cpp.llama_model_chat_template(self._model, None)
        return template.decode("utf-8") if template else None

    # -- the KV cache and the batch --------------------------------------------------------

    def clear_all(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)

    def clear_slot(self, slot: int) -> None:
        self.truncate_slot(slot, 0)

    def copy_prefix(self, source: int, slot: int, n: int) -> None:
        """Give `slot` the source slot's cells for positions [0, n) (shared, not copied)."""
        llama_cpp.llama_memory_seq_cp(self._memory, source, slot, 0, n)

    def truncate_slot(self, slot: int, keep: int) -> None:
        """Drop the slot's KV cells at positions >= keep (0 clears the slot)."""
        llama_cpp.llama_memory_seq_rm(self._memory, slot, keep if keep > 0 else -1, -1)

    def _allocate_batch(self, n_batch: int, n_seq_max: int) -> None:
        self._tokens = np.zeros(n_batch, dtype=np.int32)
        self._positions = np.zeros(n_batch, dtype=np.int32)
        self._n_seq_id = np.ones(n_batch, dtype=np.int32)
        self._want_logits = np.zeros(n_batch, dtype=np.int8)
        self._slot_ids = np.arange(n_seq_max, dtype=np.int32)
        self._slot_id_pointers = np.zeros(n_batch, dtype=np.uint64)
        self._slot_ids_address = self._slot_ids.ctypes.data
        self._batch = llama_cpp.llama_batch(
            n_tokens=0,
            token=self._tokens.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            embd=ctypes.POINTER(ctypes.c_float)(),
            pos=self._positions.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self._slot_id_pointers.ctypes.data,
                               ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id))),
            logits=self._want_logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    # -- interrupting a decode -------------------------------------------------------------

    def interrupt(self) -> None:
        """Make the `decode` in progress (or the next one) stop at its next graph node and
        raise `DecodeInterrupted` (any thread). On a backend without abort support (GPUs)
        the decode finishes."""
        self._interrupt_flag[0] = b"\x01"

    def clear_interrupt(self) -> None:
        """Forget an `interrupt` that came too late to stop a decode."""
        self._interrupt_flag[0] = b"\x00"

    def decode(self, items: list[BatchItem]) -> npt.NDArray[np.float32]:
        """Decode one batch; return the rows of logits of the items with `want_logits`, in
        order: one row for each of an item's last `num_logits` tokens. Raises
        `DecodeInterrupted` if `interrupt` stopped it, with the KV cache as it was before.

        The returned array is a view of llama.cpp's buffer, valid until the next decode.
        """
        n = 0
        for item in items:
            count = len(item.tokens)
            end = n + count
            self._tokens[n:end] = item.tokens
            self._positions[n:end] = np.arange(item.start, item.start + count, dtype=np.int32)
            self._slot_id_pointers[n:end] = self._slot_ids_address + 4 * item.slot
            self._want_logits[n:end] = 0
            if item.want_logits:
                self._want_logits[end - min(item.num_logits, count):end] = 1
            n = end
        if n == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        if n > self.config.n_batch:
            raise RunnerError(f"batch of {n} tokens exceeds n_batch {self.config.n_batch}")
        self._batch.n_tokens = n
        status = on_compute_thread(llama_cpp.llama_decode, self._ctx, self._batch)
        if status == 2:  # interrupted: llama.cpp dropped the cells of the ubatch it was in
            for item in items:  # and of any it had finished before
                llama_cpp.llama_memory_seq_rm(self._memory, item.slot, item.start, -1)
            raise DecodeInterrupted("the decode was interrupted")
        if status != 0:
            raise RunnerError(f"llama_decode failed with status {status}")
        n_outputs = int(self._want_logits[:n].sum())
        if n_outputs == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        pointer = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(n_outputs, self.n_vocab))

    def measure_step_costs(self, sizes: Seq[int] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
                           repeats: int = 3, context: int = 64
                           ) -> tuple[tuple[int, float], ...]:
        """Time decode steps of one sequence carrying `sizes` tokens (with logits for each,
        as a step verifying drafts has) after `context` tokens of cache: (tokens, median
        time in steps of one token), for the speculation's cost model. Uses slot 0 and
        clears it: call it before anything else decodes.

        The whole measurement runs as one job on the process's llama.cpp thread
        (compute_thread.py), where its decodes run directly: another engine's decode cannot
        fall between them, and the times hold no wait for that thread and no handoff. Other
        engines' decodes wait for the whole measurement (7-8 s on a 2-core CPU).
        """
        return on_compute_thread(self._measure_step_costs, sizes, repeats, context)

    def _measure_step_costs(self, sizes: Seq[int], repeats: int, context: int
                            ) -> tuple[tuple[int, float], ...]:
        limit = min(self.config.n_batch, self.config.n_ctx // 2)
        sizes = [size for size in sizes if size <= limit] or [1]
        context = min(context, limit)
        text = self.tokenize("The river runs past the old mill and the bridge. ",
                             add_special=False)
        filler = (text * (1 + (context + max(sizes)) // max(len(text), 1)))[
            :context + max(sizes)]
        self.clear_slot(0)
        self.decode([BatchItem(0, 0, filler[:context], False)])
        times: dict[int, float] = {}
        for size in (sizes[0], *sizes):   # the first size twice: a warm-up
            runs = []
            for _ in range(repeats):
                started = time.perf_counter()
                self.decode([BatchItem(0, context, filler[:size], True, size)])
                runs.append(time.perf_counter() - started)
                self.truncate_slot(0, context)
            times[size] = sorted(runs)[len(runs) // 2]
        self.clear_slot(0)
        unit = times[sizes[0]]   # sizes start at 1
        return tuple((size, times[size] / unit) for size in sizes)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None
