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
    service = app.build_service(config)
    app.load_models(service)  # the app loads them once its page is served
    return service


# The case: a fact said in turn 1, asked for after twenty turns, once it has left the window. It was marked
# xfail while the answer flipped with single words of the system prompt; since the tracked-state block appears only
# beside a message it relates to, it passed on five runs in a row (three of them fresh-clone CI runs).
def test_matilda_is_remembered_after_twenty_turns(service):
    conv = service.new_conversation()
    list(service.respond("key:ana", conv, "My daughter's name is Matilda and she is seven."))
    budget = service.generator.prompt_budget(service.settings)

    def kept() -> str:  # what the kept turns say (the fact must have left them: condensed out)
        return "".join(m.content for m in conv.render(service.generator.count_tokens, budget)[1:])

    # At least twenty turns, and more until the first one has left the window (reply lengths vary).
    for i in range(40):
        list(service.respond("key:ana", conv, FILLER[i % len(FILLER)]))
        if i >= 19 and "Matilda" not in kept():
            break
    assert "Matilda" not in kept()
    name = list(service.respond("key:ana", conv, "What is my daughter's name?"))[-1]
    age = list(service.respond("key:ana", conv, "And how old is she?"))[-1]
    assert "Matilda" in name
    assert "seven" in age.lower() or "7" in age
