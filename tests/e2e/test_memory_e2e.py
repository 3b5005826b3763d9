"""The real default model remembers a fact from the first turn after twenty more (the app's own service)."""

import pytest

import app
from chatbot.config import Config

FILLER = ["Give me one idea for a rainy Saturday.", "What is a good stretch after a long day?",
          "Suggest a quick vegetarian dinner.", "How do I keep basil alive on a windowsill?",
          "What is a polite way to decline a meeting?", "Recommend a board game for a family evening.",
          "How can I fall asleep faster?", "What should I pack for a day at the beach?",
          "Give me a short tip for learning a new language.", "How do I clean a cast iron pan?"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    config = Config(data_dir=tmp_path_factory.mktemp("data"), speech_model="none")
    return app.build_service(config)


def test_matilda_is_remembered_after_twenty_turns(service):
    conv = service.new_conversation()
    list(service.respond("key:ana", conv, "My daughter's name is Matilda and she is seven."))
    for i in range(20):
        list(service.respond("key:ana", conv, FILLER[i % len(FILLER)]))
    budget = service.generator.prompt_budget(service.settings)
    history = conv.render(service.generator.count_tokens, budget)
    assert "Matilda" not in "".join(m.content for m in history[1:])  # condensed out of the kept turns
    name = list(service.respond("key:ana", conv, "What is my daughter's name?"))[-1]
    age = list(service.respond("key:ana", conv, "And how old is she?"))[-1]
    assert "Matilda" in name
    assert "seven" in age.lower() or "7" in age
