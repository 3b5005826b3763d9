"""Conversation list lines: titles with the day they last changed, in words (no Gradio needed)."""

import time
from datetime import datetime

from chatbot.conversation.listing import day_words, list_label
from chatbot.conversation.store import ConversationSummary

NOW = datetime(2026, 11, 24, 9, 30).timestamp()  # a Tuesday morning, local time


def at(*when: int) -> float:
    return datetime(*when).timestamp()


def test_days_in_words():
    assert day_words(at(2026, 11, 24, 0, 0, 1), NOW) == "Today"
    assert day_words(at(2026, 11, 24, 23, 59), NOW) == "Today"  # later today (a clock a little ahead)
    assert day_words(at(2026, 11, 23, 23, 59), NOW) == "Yesterday"
    assert day_words(at(2026, 11, 23, 0, 0), NOW) == "Yesterday"
    assert day_words(at(2026, 11, 22, 12, 0), NOW) == "Sun 22 Nov"
    assert day_words(at(2026, 1, 1, 12, 0), NOW) == "Thu 1 Jan"
    assert day_words(at(2025, 12, 31, 12, 0), NOW) == "31 Dec 2025"  # another year says which
    assert day_words(at(2027, 3, 2, 12, 0), NOW) == "2 Mar 2027"


def test_yesterday_across_a_month_and_a_year():
    assert day_words(at(2026, 2, 28, 20, 0), at(2026, 3, 1, 8, 0)) == "Yesterday"
    assert day_words(at(2025, 12, 31, 20, 0), at(2026, 1, 1, 8, 0)) == "Yesterday"


def test_a_list_line_has_the_title_and_the_day():
    summary = ConversationSummary("id", "Weekend hike", created=at(2026, 11, 1, 10, 0), updated=at(2026, 11, 23, 18, 0),
                                  turns=4)
    assert list_label(summary, NOW) == "Weekend hike · Yesterday"
    untitled = ConversationSummary("id", "", created=NOW, updated=NOW, turns=2)
    assert list_label(untitled, NOW) == "Untitled · Today"
    assert list_label(ConversationSummary("id", "x", time.time(), time.time(), 1)) == "x · Today"
