"""Replies written for the screen become words for the ear, cut into sentences while they stream."""

from chatbot.voice.speakable import SentenceStream, speakable, split_sentences

REPLY = """## Weekend plan
Sure! Here is a **short** plan for *Saturday*. Details: https://www.example.com/trails?id=7 and [the map](https://maps.example.org/x).

```python
print([x * x for x in range(3)])
```

| Day | Walk | km |
|-----|------|----|
| Sat | Ridge | 8 |
| Sun | Lake | 5 |

- Bring water & snacks (e.g. nuts).
- Run `pip install trails` first.
"""


def test_markdown_is_said_not_spelled():
    said = speakable(REPLY)
    for symbol in ("#", "*", "`", "|", "http", "](", "---", "print(", "&"):
        assert symbol not in said, (symbol, said)
    assert "Weekend plan." in said  # a heading is its own sentence
    assert "Here is a short plan for Saturday." in said
    assert "a link to example.com" in said and "the map" in said
    assert "Here is the code." in said
    assert "a table with 2 rows of Day, Walk, km" in said
    assert "Bring water and snacks" in said and "pip install trails" in said


def test_long_inline_code_and_emails_are_summarised():
    said = speakable("Write `for item in sorted(items, key=len): print(item)` or mail me@example.com.")
    assert "this code" in said and "sorted" not in said
    assert "an email address" in said and "@" not in said


def test_plain_text_is_unchanged():
    text = "Paris is the capital of France. It has about two million people."
    assert speakable(text) == text


def test_sentences_keep_abbreviations_together():
    assert split_sentences("Bring snacks, e.g. nuts. Then go! Is it far? No.") == [
        "Bring snacks, e.g. nuts.", "Then go!", "Is it far?", "No."]


def _streamed(reply: str, step: int = 3) -> tuple[list[str], list[int]]:
    stream, said, when = SentenceStream(), [], []
    for end in range(step, len(reply) + step, step):
        new = stream.feed(reply[:end])
        said += new
        when += [end] * len(new)
    return said + stream.finish(reply), when


def test_stream_gives_first_sentence_before_the_reply_ends():
    reply = "Paris is the capital of France. It is known for the Eiffel Tower. Anything else?"
    said, when = _streamed(reply)
    assert said == ["Paris is the capital of France.", "It is known for the Eiffel Tower.", "Anything else?"]
    assert when[0] < len(reply) // 2  # the first sentence was ready while most of the reply was unwritten


def test_stream_says_everything_once_and_waits_for_code_and_tables():
    said, _ = _streamed(REPLY)
    whole = split_sentences(speakable(REPLY))
    assert " ".join(said).split() == " ".join(whole).split()  # each sentence once, in order
    assert sum("Here is the code." in s for s in said) == 1
    assert [s for s in said if "table" in s] == ["Here is a table with 2 rows of Day, Walk, km."]


def test_the_voice_starts_with_the_first_clause():
    reply = "The capital of France is Paris, a city on the river Seine. It is known for its museums."
    said, when = _streamed(reply)
    assert said == ["The capital of France is Paris,", "a city on the river Seine.", "It is known for its museums."]
    assert when[0] < reply.index("Seine")  # spoken before the first sentence was written to its end
    short = "Yes, of course. Paris is the capital."  # a clause this short waits for its sentence
    assert _streamed(short)[0] == ["Yes, of course.", "Paris is the capital."]
    joined = "Yes, it is. Paris, in France, is the capital."  # a too short first sentence joins the clause
    assert _streamed(joined)[0] == ["Yes, it is. Paris, in France,", "is the capital."]
