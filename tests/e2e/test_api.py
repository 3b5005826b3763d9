"""The chat through the Gradio API (gradio_client), against the real app and bundled models."""

import pytest
from gradio_client import Client

from tests.support.drivers import api_send as send
from tests.support.drivers import text_of


@pytest.fixture
def client(app_server):
    return Client(app_server.url, verbose=False)


def test_one_client_holds_one_multi_turn_conversation(client):
    send(client, "Hi! My name is Ana and I live in Lisbon.")
    send(client, "What is 12 plus 30?")
    chat = send(client, "Remind me, what is my name?")
    assert [m["role"] for m in chat] == ["user", "assistant"] * 3
    assert "Ana" in text_of(chat[-1])


def test_clients_do_not_share_conversations(app_server):
    first, second = Client(app_server.url, verbose=False), Client(app_server.url, verbose=False)
    send(first, "My favourite colour is teal.")
    chat = send(second, "Hello!")
    assert len(chat) == 2 and "teal" not in text_of(chat[0])


def test_a_bad_upload_gets_a_friendly_message_and_the_chat_goes_on(client, tmp_path):
    send(client, "Hi! My name is Ana.")
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not a picture")
    chat = send(client, "What is in this photo?", [bogus])
    reply = text_of(chat[-1])
    assert "image" in reply.lower() and "Traceback" not in reply
    chat = send(client, "What is my name?")
    assert "Ana" in text_of(chat[-1])
