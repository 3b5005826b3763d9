"""Tiny randomly initialised models, built offline, that exercise the real loading code paths."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    T5Tokenizer,
)

_WORDS = ("hello what is the name of my cat dog photo sign says open closed capital france paris "
          "voice message please tell me about weather today tomorrow and a an red blue green").split()


def corpus(lines: int = 400) -> list[str]:
    """Deterministic pseudo-sentences: enough text to train a small tokenizer."""
    combos = itertools.product(_WORDS, repeat=3)
    sentences = [" ".join(c) + "." for c, _ in zip(combos, range(lines))]
    # Dialogue framing as the seq2seq backend writes it, so those characters are in the vocabulary.
    return sentences + [f"You are helpful.\nUser: {s}\nAssistant: {s}" for s in sentences[:50]]


def build_tiny_t5(directory: Path) -> Path:
    """A T5 with a SentencePiece vocabulary trained here (T5Tokenizer needs dir/spiece.model)."""
    directory.mkdir(parents=True, exist_ok=True)
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=model_file, vocab_size=64,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    (directory / "spiece.model").write_bytes(model_file.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(directory, extra_ids=0)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
                      num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    _scramble(T5ForConditionalGeneration(config)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _scramble(model: torch.nn.Module) -> torch.nn.Module:
    """Wide random weights: the default init of a tiny model predicts one token forever, which hides streaming bugs."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_causal(directory: Path) -> Path:
    """A tiny Qwen2-architecture chat model with a BPE tokenizer trained here and a ChatML template."""
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    _scramble(Qwen2ForCausalLM(config)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
