"""The local reply model: transformers on the CPU, streaming rendered messages into reply text.

Two kinds of model share one streaming loop: causal chat models (prompt built with
the tokenizer's chat template) and seq2seq models such as T5/Flan-T5/BART
(prompt written as plain dialogue text). `load_generator` picks the backend
from the model's config, never from its name.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from chatbot import footprint, weights
from chatbot.errors import UserFacingError
from chatbot.generation import decode_step
from chatbot.generation.base import FinishReason, GenerationSettings, done, prompt_budget
from chatbot.generation.prefix_cache import PrefixCache, budget_for
from chatbot.generation.quantize import FORMAT_VERSION, load_quantized, quantize, save_quantized
from chatbot.state import Message, Role

log = logging.getLogger(__name__)

# Triton compiles GPU kernels: nothing here uses it, but it comes with torch's PyPI wheel, and transformers'
# model code (through torch._dynamo) imports it when installed: 50 MB of memory for nothing. That import
# happens when a model is first loaded, after this line, which marks the package absent.
sys.modules.setdefault("triton", None)
# torch (imported above) has mapped its CUDA libraries: their pages touched at start-up are let go before any
# model loads, so they count neither now nor in the peak (≈130 MB; this backend runs on the CPU).
footprint.drop_cuda_library_pages()

# All torch work of reply models (loading, quantizing, generating) runs on this one thread: torch's
# OpenMP pool belongs to the calling thread, and a second pool competing for the cores cost a third
# of the decoding speed on a 2-core machine (48 vs 34 tokens/s measured).
_MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reply-model")
# Prompts are read this many tokens at a time; between chunks a read-ahead gives way to a waiting
# reply and a reply honours its stop (one chunk is a fraction of a second, however long the prompt).
PREFILL_CHUNK = 64


def wait_idle() -> None:
    """Block until the reply-model thread has finished everything queued so far (for benchmarks)."""
    _MODEL_THREAD.submit(lambda: None).result()


class _TokenStreamer(TextIteratorStreamer):
    """transformers' streamer, handing on each token's text as soon as it is decoded.

    Its parent holds text back until a space follows, to print whole words in a terminal: every reply's
    first words then waited one more decoding step (≈25 ms). A token can end inside a character (byte-level
    vocabularies split UTF-8); such text, decoded with a trailing U+FFFD, waits for the token that ends it.
    """

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\ufffd"):
            return
        piece = text[self.print_len:]
        if text.endswith("\n"):  # start decoding afresh: each token decodes only its line so far
            self.token_cache, self.print_len = [], 0
        else:
            self.print_len = len(text)
        self.on_finalized_text(piece)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        # A reply cut inside a character (its token limit, Stop) ends without the half it has.
        super().on_finalized_text(text.rstrip("\ufffd") if stream_end else text, stream_end)


class _StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once any of this request's events is set."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        stopped = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stopped, dtype=torch.bool, device=input_ids.device)


class _StopAtSentenceEnd(StoppingCriteria):
    """Near the token limit, ends the reply as soon as a sentence ends, so it is not cut mid-sentence."""

    def __init__(self, tokenizer, prompt_length: int, settings: GenerationSettings):
        self.tokenizer = tokenizer
        # The last `sentence_tail` tokens, but at most a quarter of a short reply (a 48-token limit is not
        # meant to end every reply at its first full stop).
        tail = min(settings.sentence_tail, settings.max_new_tokens // 4)
        self.from_length = prompt_length + max(1, settings.max_new_tokens - tail)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = input_ids.shape[1] >= self.from_length and bool(
            _SENTENCE_END.search(self.tokenizer.decode(input_ids[0, -2:], skip_special_tokens=True)))
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _BreakLoops(LogitsProcessor):
    """Bans the token that would start a fourth back-to-back copy of a phrase in the reply.

    Greedy decoding of a small model falls into loops that the repetition penalty does not stop (it lowers
    a token once, however often it came): "a towel, a towel, a towel, …" or "In 1611, Lisbon became the
    capital of the United Kingdom. In 1612, …" to the token limit, so copies that differ only in their
    numbers count as copies. Banning every repeated n-gram (`no_repeat_ngram_size`) would also forbid
    copying a fact from the prompt or writing code, which repeats short phrases all the time.
    """

    def __init__(self, prompt_length: int, numbers: frozenset[int] = frozenset(), copies: int = 3,
                 longest: int = 32):
        self.prompt_length, self.numbers, self.copies, self.longest = prompt_length, numbers, copies, longest

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, reply in enumerate(input_ids[:, self.prompt_length:].tolist()):
            ids = [-1 if i in self.numbers else i for i in reply]  # every number token alike
            for period in range(1, min(self.longest, len(ids) // self.copies) + 1):
                tail = ids[len(ids) - period:]
                if all(ids[len(ids) - (k + 1) * period:len(ids) - k * period] == tail for k in range(1, self.copies)):
                    scores[row, list(self.numbers) if tail[0] == -1 else tail[0]] = -float("inf")
        return scores


class _DontRepeatYourself(LogitsProcessor):
    """DRY: lowers each token that would extend a phrase the reply has already written, more the longer the copy.

    The penalty for a token that would make an earlier run of `length` tokens appear again is
    `multiplier * base ** (length - allowed)` once `length >= allowed` (the "DRY" sampler of
    text-generation-webui and llama.cpp). Only the reply's own tokens count: the prompt's facts, names and
    code may be copied freely, and the repetition penalty (which does count the prompt) keeps the question's
    "my" from being echoed. A match stops at a sequence breaker (a token with a line break, colon, quote or
    asterisk), so lists, headings and lines of code that share their start are not pushed apart.
    """

    def __init__(self, prompt_length: int, breakers: frozenset[int], multiplier: float, base: float = 1.75,
                 allowed: int = 2, longest: int = 50):
        self.prompt_length, self.breakers = prompt_length, breakers
        self.multiplier, self.base, self.allowed, self.longest = multiplier, base, allowed, longest

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, ids in enumerate(input_ids[:, self.prompt_length:].tolist()):
            if not ids or ids[-1] in self.breakers:
                continue
            lengths: dict[int, int] = {}  # next token -> the longest earlier run it would repeat
            for i in range(len(ids) - 1):
                if ids[i] != ids[-1] or ids[i + 1] in self.breakers:
                    continue
                length = 1
                while (length < self.longest and length <= i and ids[i - length] == ids[-1 - length]
                       and ids[i - length] not in self.breakers):
                    length += 1
                lengths[ids[i + 1]] = max(length, lengths.get(ids[i + 1], 0))
            for token, length in lengths.items():
                if length >= self.allowed:
                    scores[row, token] -= self.multiplier * self.base ** (length - self.allowed)
        return scores


# What ends a phrase for the DRY penalty (llama.cpp's default breakers).
_BREAKERS = ("\n", ":", '"', "*")

# A sentence's end: punctuation after a non-digit ("1." starts a list item), maybe closing quotes.
_SENTENCE_END = re.compile(r"[^\d\s][.!?…][\"')\]*]*\s*$")


class TransformersGenerator(ABC):
    """A transformers model in this process (implements `base.ReplyGenerator`)."""

    reads_notes = True

    prefix_cache: PrefixCache | None = None  # set by backends whose prompts grow turn by turn

    def __init__(self, name: str, model, tokenizer, context_tokens: int):
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context_tokens = context_tokens
        # One generation at a time: the CPU has few cores and concurrent runs only slow each other.
        self._lock = threading.Lock()
        # Replies submitted to the model thread but not started yet: reading ahead gives way to them.
        self._replies_waiting = 0
        self._waiting_lock = threading.Lock()
        self._remembered_count = functools.lru_cache(maxsize=2048)(self._count)
        # The vocabulary's number tokens ("1", " 42"): loops whose copies differ only in them are still loops
        # (`_BreakLoops`). Found while the model loads (≈0.3 s for 151k tokens), not in the first reply.
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.numbers = frozenset(i for i, t in enumerate(tokens) if t and t.lstrip("Ġ▁").isdigit())
        # Tokens that end a phrase for `_DontRepeatYourself` (≈0.5 s for 151k tokens, also while the model loads).
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.breakers = frozenset(i for i, t in enumerate(texts) if any(c in t for c in _BREAKERS))

    @classmethod
    def from_config(cls, config) -> TransformersGenerator:
        """The registry's entry point: the model the settings name (bundled key, folder or hub id)."""
        return load_generator(config.text_model, quantization=config.quantize, max_context=config.max_context)

    def prefill(self, messages: list[Message], conversation: str | None = None) -> Future:
        """Start reading a prompt prefix (the system prompt, a moved window) into the cache ahead of time.

        It runs on the model thread in chunks and stops early when a reply is waiting; what was
        read is kept. Only backends that reuse caches do anything.
        """
        return done()

    def _count_waiting(self, change: int) -> None:
        with self._waiting_lock:
            self._replies_waiting += change

    def count_tokens(self, text: str) -> int:
        # Every turn fits the whole history into the budget again, counting the same messages (and condensed
        # notes) as the turn before: 10 ms of a turn's start after 40 turns, unless remembered.
        return self._remembered_count(text) if len(text) <= 8192 else self._count(text)

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_budget(self, settings: GenerationSettings) -> int:
        return prompt_budget(self.context_tokens, settings)

    @abstractmethod
    def encode_prompt(self, messages: list[Message]) -> dict[str, torch.Tensor]:
        """Tokenised model inputs for `messages` (batch of one)."""

    def stream(self, messages: list[Message], settings: GenerationSettings, stop: threading.Event | None = None,
               conversation: str | None = None) -> Generator[str, None, FinishReason]:
        """Yield the reply in pieces as it is generated; setting `stop` ends it early. Returns why it ended."""
        stop = stop or threading.Event()
        abandoned = threading.Event()  # our own signal, so the caller's `stop` keeps meaning "user asked"
        inputs = self.encode_prompt(messages)
        streamer = _TokenStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []
        generated: list[int] = []  # new tokens, for the finish reason

        def stopped() -> bool:
            return stop.is_set() or abandoned.is_set()

        def run() -> None:
            self._count_waiting(-1)
            try:
                with self._lock, torch.inference_mode():
                    if not stopped():
                        ids = inputs["input_ids"][0]
                        cache = self._reusable_cache(ids, conversation)
                        if cache is not None:
                            # A long prompt is read chunk by chunk so a stop is honoured while it is read;
                            # `generate` reads the last chunk and starts the reply from its logits.
                            self._read(ids[:-PREFILL_CHUNK], cache, keep_going=lambda: not stopped())
                            if stopped():
                                if cache.get_seq_length():
                                    self.prefix_cache.put(ids, cache, conversation)  # it serves the next try
                                return
                        sequences = self.model.generate(
                            **inputs, **settings.generate_kwargs(), streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([
                                _StopOnEvent(stop, abandoned),
                                _StopAtSentenceEnd(self.tokenizer, inputs["input_ids"].shape[1], settings)]),
                            logits_processor=self._processors(inputs["input_ids"].shape[1], settings),
                            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                            **({"past_key_values": cache} if cache is not None else {}))
                        generated.append(self._new_tokens(inputs, sequences))
                        if cache is not None:
                            self.prefix_cache.put(sequences[0], cache, conversation)
            except BaseException as error:  # noqa: BLE001 - surfaced in the consumer's thread below
                failure.append(error)
            finally:
                streamer.end()
                # Each step re-allocated the growing KV cache: free pages the heap would otherwise keep.
                footprint.give_back()

        self._count_waiting(+1)
        worker = _MODEL_THREAD.submit(run)
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            # Also reached when the consumer goes away (closed tab): free the CPU at once.
            abandoned.set()
            worker.result()
        if failure:
            raise failure[0]
        cut = generated and generated[0] >= settings.max_new_tokens and not stop.is_set()
        return FinishReason.LENGTH if cut else FinishReason.STOP

    def _processors(self, prompt_length: int, settings: GenerationSettings) -> LogitsProcessorList:
        processors = [_BreakLoops(prompt_length, self.numbers)]
        if settings.dry_multiplier > 0:
            processors.append(_DontRepeatYourself(prompt_length, self.breakers, settings.dry_multiplier,
                                                  settings.dry_base, settings.dry_allowed_length))
        return LogitsProcessorList(processors)

    @staticmethod
    def _new_tokens(inputs: dict[str, torch.Tensor], sequences: torch.Tensor) -> int:
        return sequences.shape[1] - inputs["input_ids"].shape[1]

    def _read(self, ids: torch.Tensor, cache, keep_going: Callable[[], bool]) -> None:
        """Extend `cache` over `ids` chunk by chunk while `keep_going()` (call under the lock, on the model thread)."""
        read_in_chunks(self.model, ids, cache, keep_going)

    def _reusable_cache(self, ids: torch.Tensor, conversation: str | None, ahead: bool = False):
        """A KV cache already holding the longest known prefix of `ids` (or an empty one to fill)."""
        if self.prefix_cache is None:
            return None
        return self.prefix_cache.take(ids, conversation, ahead) or decode_step.new_cache(self.model.config)


class CausalChatGenerator(TransformersGenerator):
    """Decoder-only chat models; the prompt comes from the tokenizer's chat template."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A growing cache keeps up to GROWTH positions and a read's chunk of room behind its tokens.
        spare = decode_step.GROWTH + PREFILL_CHUNK
        self.prefix_cache = PrefixCache(max_bytes=budget_for(self.model.config, self.context_tokens, spare))

    def prefill(self, messages: list[Message], conversation: str | None = None) -> Future:
        ids = self.tokenizer.apply_chat_template(_chat(messages), return_dict=True, return_tensors="pt")["input_ids"]
        reading = _MODEL_THREAD.submit(self._prefill, ids[0], conversation)
        reading.add_done_callback(_log_failure)  # nobody waits on a read-ahead: its errors would go unseen
        return reading

    def _prefill(self, ids: torch.Tensor, conversation: str | None) -> None:
        with self._lock, torch.inference_mode():
            if self.prefix_cache is None:
                return
            cache = self._reusable_cache(ids, conversation, ahead=True)
            self._read(ids, cache, keep_going=lambda: not self._replies_waiting)
            # Also what was taken and not read further (a reply came first) goes back: it is the reply's.
            if cache.get_seq_length():
                self.prefix_cache.put(ids, cache, conversation)

    def encode_prompt(self, messages: list[Message]) -> dict[str, torch.Tensor]:
        # A trailing assistant message is a reply to continue: no new reply header after it.
        more = bool(messages) and messages[-1].role is Role.ASSISTANT
        return self.tokenizer.apply_chat_template(_chat(messages), add_generation_prompt=not more,
                                                  continue_final_message=more, return_dict=True, return_tensors="pt")


def read_in_chunks(model, ids: torch.Tensor, cache, keep_going: Callable[[], bool] = lambda: True) -> None:
    """Extend `cache` over the token ids `ids` (1-D) `PREFILL_CHUNK` at a time, while `keep_going()`.

    Besides a stop honoured between chunks, a chunk's activations are all a read holds at once: 1,400 tokens
    read in one pass made a peak 370 MB higher (bench_generation's long prompt).
    """
    done = cache.get_seq_length()
    while done < len(ids) and keep_going():
        chunk = ids[done:done + PREFILL_CHUNK]
        model(input_ids=chunk[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        done += len(chunk)


def _log_failure(work: Future) -> None:
    if work.exception() is not None:
        log.error("Reading a prompt ahead failed", exc_info=work.exception())


def _chat(messages: list[Message]) -> list[dict[str, str]]:
    """Messages in the form chat templates take."""
    return [{"role": m.role.value, "content": m.content} for m in messages]


class Seq2SeqGenerator(TransformersGenerator):
    """Encoder-decoder models (T5, Flan-T5, BART): the dialogue goes to the encoder as text."""

    _SPEAKER = {Role.USER: "User", Role.ASSISTANT: "Assistant"}

    def encode_prompt(self, messages: list[Message]) -> dict[str, torch.Tensor]:
        lines = [m.content if m.role is Role.SYSTEM else f"{self._SPEAKER[m.role]}: {m.content}" for m in messages]
        more = bool(messages) and messages[-1].role is Role.ASSISTANT  # a reply to continue
        prompt = "\n".join(lines if more else lines + ["Assistant:"])
        return self.tokenizer(prompt, return_tensors="pt", truncation=True, max_length=self.context_tokens)

    @staticmethod
    def _new_tokens(inputs: dict[str, torch.Tensor], sequences: torch.Tensor) -> int:
        return sequences.shape[1] - 1  # the decoder's output starts with its start token


def load_generator(spec: str, *, quantization: str = "none", max_context: int = 2048) -> TransformersGenerator:
    """Load a bundled model key, a local directory or a Hugging Face hub id.

    Raises UserFacingError with the reason when the model cannot be loaded.
    """
    return _MODEL_THREAD.submit(_load_generator, spec, quantization, max_context).result()


def _load_generator(spec: str, quantization: str, max_context: int) -> TransformersGenerator:
    try:
        path = str(weights.CHAT_MODELS[spec].checkpoint_dir()) if spec in weights.CHAT_MODELS else spec
        config = AutoConfig.from_pretrained(path)
        # The bundled checkpoints carry a tokenizer.json: loaded as it is, the tokenizer keeps no Python copy of
        # its vocabulary and merges as the model-specific classes do (Qwen2's: 50 MB more, the same token ids).
        tokenizer = (PreTrainedTokenizerFast if spec in weights.CHAT_MODELS else AutoTokenizer).from_pretrained(path)
        backend = Seq2SeqGenerator if config.is_encoder_decoder else CausalChatGenerator
        if spec in weights.CHAT_MODELS and quantization != "none":
            model = load_bundled(spec, quantization)
        else:
            auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            model = quantize(auto.from_pretrained(path, dtype=torch.float32), quantization)
    except Exception as error:  # noqa: BLE001 - any loading failure gets the same clear message
        hint = "" if Path(spec).exists() or spec in weights.CHAT_MODELS else (
            " (not a local folder; downloading it from the Hugging Face hub needs internet access)")
        if isinstance(error, ImportError) or " is required" in str(error):  # e.g. accelerate for GGUF files
            hint += f"; {weights.install_hint()}"
        raise UserFacingError(f"Could not load the text model '{spec}'{hint}: {error}") from error
    if backend is CausalChatGenerator and not tokenizer.chat_template:
        raise UserFacingError(f"The text model '{spec}' is a causal model without a chat template; "
                              "choose an instruction-tuned (chat) model")
    if backend is CausalChatGenerator and decode_step.attach(model):
        log.info("Decoding steps use the lean one-token pass")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or max_context
    log.info("Loaded text model %s (%s, %s)", spec, backend.__name__, quantization)
    return backend(spec, model, tokenizer, min(max_context, limit))


def load_bundled(key: str, mode: str):
    """A bundled chat model, quantized with `mode`, from its quantized checkpoint (made at the first start).

    Later starts build no fp32 weights at all: the packed tensors are read (embedding rows mapped) from the cache.
    """
    bundled = weights.CHAT_MODELS[key]

    def build(folder: Path) -> None:
        log.info("Quantizing %s to %s once (the quantized checkpoint is kept in the cache) ...", key, mode)
        fp32 = AutoModelForCausalLM.from_pretrained(bundled.checkpoint_dir(), dtype=torch.float32)
        save_quantized(quantize(fp32.eval(), mode), folder)

    # The int4 packing is the CPU kernel's own layout: a torch release may change it, so its version names the
    # folder, as does the file layout (checkouts of another layout sharing the cache keep their own folder).
    version = f"v{FORMAT_VERSION}-torch{torch.__version__.split('+')[0]}"
    return load_quantized(bundled.quantized_dir(mode, build, version))
