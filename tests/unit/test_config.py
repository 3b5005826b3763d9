"""The command line: `--help` names every setting with its default, and the cache directory."""

import re

import pytest

from chatbot.config import Config, parse_args


def test_help_gives_every_setting_a_description_and_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "CHATBOT_CACHE_DIR" in text and "default: None" not in text
    d = Config()
    for option, default in [("--port", d.port), ("--max-new-tokens", d.max_new_tokens), ("--top-p", d.top_p),
                            ("--repetition-penalty", d.repetition_penalty), ("--temperature", d.temperature)]:
        described = re.search(rf"{option} \S+ (.+?) \(default: {re.escape(str(default))}\)", text)
        assert described and len(described.group(1)) > 10, option
    assert re.search(r"--threads THREADS CPU threads .*\(default: as many as torch chooses", text)
