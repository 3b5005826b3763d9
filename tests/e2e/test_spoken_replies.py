"""Spoken replies are intelligible: the default voice, read back by the bundled Whisper base, says the reply."""

import pytest

from bench.bench_voice import REPLIES, round_trip, word_error_rate


def test_word_error_rate_counts_edits():
    assert word_error_rate("the cat sat", "the cat sat") == 0
    assert word_error_rate("the cat sat", "the hat sat down") == pytest.approx(2 / 3)


def test_round_trip_through_whisper_base_keeps_the_words():
    from chatbot.perception.speech import load_recognizer
    from chatbot.voice.tts import load_voice

    rows, _ = round_trip(load_voice(), load_recognizer("whisper-base", "en"), REPLIES)
    words = sum(r["words"] for r in rows)
    wer = sum(r["wer"] * r["words"] for r in rows) / words
    assert len(rows) == len(REPLIES) and words > 100
    assert wer <= 0.10, rows
    assert all(r["wer"] <= 0.2 for r in rows), rows
