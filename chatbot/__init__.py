"""A multi-turn multimodal chatbot: dialogue state, multimodal encoder, reply decoder."""
