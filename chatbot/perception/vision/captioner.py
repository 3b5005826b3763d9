"""A caption, or an answer to the user's question, from a Hugging Face captioning / VQA / vision-language model."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from chatbot import openmp
from chatbot.errors import UserFacingError
from chatbot.perception.images import LoadedImage
from chatbot.perception.vision.base import ImageAnalyzer, downscaled
from chatbot.state import Observation, ObservationKind

log = logging.getLogger(__name__)

DEFAULT_QUESTION = "What is in this picture?"


class Captioner(ImageAnalyzer):
    """A description from a Hugging Face model (hub id or local folder) that looks at the photo itself.

    Captioning models (BLIP, BLIP-2, GIT, vision encoder-decoders) describe the picture
    unprompted, once per photo. Models that take a question, visual-question-answering
    models (BLIP VQA) and chat vision-language models (SmolVLM, LLaVA, Qwen2-VL...), are
    asked what the user wrote with the photo (or `DEFAULT_QUESTION` when they wrote nothing),
    every time a new question comes with it. Nothing is downloaded: a hub id must
    already be in the local Hugging Face cache.
    """

    def __init__(self, model: str | Path, *, max_new_tokens: int = 40, max_side: int = 1024) -> None:
        self.name = f"caption:{model}"
        self._max_new_tokens = max_new_tokens
        self._max_side = max_side  # processors resize to ~384 px anyway; skip their work on 12 MP
        self._lock = threading.Lock()
        try:
            self._processor, self._model, self.wants_question = _load_caption_model(str(model))
        except Exception as error:  # noqa: BLE001 - any loading failure means the same to the user
            log.warning("Could not load captioning model %s: %s", model, error)
            raise UserFacingError(f"The image captioning model '{model}' could not be loaded. Check the "
                                  "name or folder; this app works offline, so a hub model must already be "
                                  "in the local Hugging Face cache.") from error
        self._chat = bool(getattr(self._processor, "chat_template", None))

    @openmp.in_passing_thread
    def caption(self, img: LoadedImage, question: str = "") -> str:
        """The model's words about `img`; for models that take a question, its answer to `question`."""
        import torch

        picture = downscaled(img.image, self._max_side)
        question = " ".join(question.split()) or DEFAULT_QUESTION
        if self._chat:
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            prompt = self._processor.apply_chat_template(conversation, add_generation_prompt=True)
            inputs = self._processor(images=[picture], text=prompt, return_tensors="pt")
        else:
            text = {"text": question} if self.wants_question else {}
            inputs = self._processor(images=picture, return_tensors="pt", **text)
        with self._lock, torch.inference_mode():
            output = self._model.generate(**inputs, max_new_tokens=self._max_new_tokens, do_sample=False)
        prompt = inputs.get("input_ids")
        if prompt is not None and output.shape[1] >= prompt.shape[1] and torch.equal(output[:, :prompt.shape[1]], prompt):
            output = output[:, prompt.shape[1]:]  # decoder-only models (SmolVLM, LLaVA) repeat the prompt first
        return " ".join(self._processor.batch_decode(output, skip_special_tokens=True)[0].split())

    def analyze(self, img: LoadedImage, question: str = "") -> list[Observation]:
        words = self.caption(img, question)
        if not words:
            return []
        if self.wants_question:
            asked = " ".join(question.split()) or DEFAULT_QUESTION
            text = f'an image model asked "{_shorten(asked, 120)}" answered: {words}'
        else:
            text = f"an image model's caption: {words}"
        return [Observation(kind=ObservationKind.CAPTION, text=text, source=self.name)]


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


@openmp.in_passing_thread  # loading runs torch ops too
def _load_caption_model(model: str):
    """(processor, model, whether it takes a question) for a captioning, VQA or chat vision-language checkpoint."""
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_VISUAL_QUESTION_ANSWERING_MAPPING_NAMES,
    )

    config = AutoConfig.from_pretrained(model, local_files_only=True)
    architecture = (config.architectures or [""])[0]
    # A VQA checkpoint loaded as the captioning class would get a randomly initialised
    # decoder and talk nonsense, so honour the architecture the checkpoint names.
    vqa_classes = set(MODEL_FOR_VISUAL_QUESTION_ANSWERING_MAPPING_NAMES.values())
    vqa = architecture in vqa_classes and architecture not in set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    model_class = getattr(transformers, architecture) if vqa else AutoModelForImageTextToText
    processor = AutoProcessor.from_pretrained(model, local_files_only=True)
    loaded = model_class.from_pretrained(model, local_files_only=True).eval()
    if not loaded.can_generate():
        raise ValueError(f"{architecture} picks answers from a fixed list instead of writing text")
    # A chat model (it has a chat template) is a conversation partner: it takes the question too.
    return processor, loaded, vqa or bool(getattr(processor, "chat_template", None))
