"""The bot's voice: replies spoken aloud, and the hands-free call that listens for the next question.

Why a stage of its own and not `perception/` or `generation/`: perception turns what the user
sent into a turn and generation writes the reply's words; this stage sits after both and turns
a reply's words into sound (speakable.py, tts.py), and, in call mode, decides when the user has
finished speaking and whether it was the user at all (listening.py). It imports from state,
perception (the recogniser) and the service, never from web; onnxruntime loads lazily.
"""
