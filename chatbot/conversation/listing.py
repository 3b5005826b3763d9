"""How a conversation is named in a list: its title and the day it last changed, in words."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from chatbot.conversation.store import ConversationSummary

UNTITLED = "Untitled"


def day_words(when: float, now: float | None = None) -> str:
    """'Today', 'Yesterday', 'Mon 23 Nov' (this year) or '23 Nov 2025', in the server's local time."""
    day = datetime.fromtimestamp(when).date()
    today = datetime.fromtimestamp(time.time() if now is None else now).date()
    if day == today:
        return "Today"
    if day == today - timedelta(days=1):
        return "Yesterday"
    # Built from numbers and fixed English names: the words do not depend on the process's locale.
    month = _MONTHS[day.month - 1]
    if day.year == today.year:
        return f"{_WEEKDAYS[day.weekday()]} {day.day} {month}"
    return f"{day.day} {month} {day.year}"


def list_label(summary: ConversationSummary, now: float | None = None) -> str:
    """A conversation's line in the side panel, e.g. 'Weekend hike · Yesterday'."""
    return f"{summary.title or UNTITLED} · {day_words(summary.updated, now)}"


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
