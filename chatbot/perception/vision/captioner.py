"""A caption (or an answer) from a Hugging Face captioning / VQA model."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from chatbot.errors import UserFacingError
from chatbot.perception.images import LoadedImage
from chatbot.perception.vision.base import ImageAnalyzer, downscaled
from chatbot.state import Observation, ObservationKind

log = logging.getLogger(__name__)


class Captioner(ImageAnalyzer):
    """A one-line description from a Hugging Face captioning or VQA model (hub id or local folder).

    Captioning models (BLIP, BLIP-2, GIT, vision encoder-decoders) describe the
    picture unprompted; visual-question-answering models (BLIP VQA) are asked `question`.
    Nothing is downloaded: a hub id must already be in the local Hugging Face cache.
    """

    def __init__(self, model: str | Path, *, question: str = "What is in this picture?",
                 max_new_tokens: int = 30, max_side: int = 1024) -> None:
        self.name = f"caption:{model}"
        self._max_new_tokens = max_new_tokens
        self._max_side = max_side  # processors resize to ~384 px anyway; skip their work on 12 MP
        self._lock = threading.Lock()
        try:
            self._processor, self._model, asks = _load_caption_model(str(model))
        except Exception as error:  # noqa: BLE001 - any loading failure means the same to the user
            log.warning("Could not load captioning model %s: %s", model, error)
            raise UserFacingError(f"The image captioning model '{model}' could not be loaded. Check the "
                                  "name or folder; this app works offline, so a hub model must already be "
                                  "in the local Hugging Face cache.") from error
        self.question = question if asks else None  # what a VQA model is asked; None for captioners

    def caption(self, img: LoadedImage) -> str:
        import torch

        picture = downscaled(img.image, self._max_side)
        text = {"text": self.question} if self.question else {}
        inputs = self._processor(images=picture, return_tensors="pt", **text)
        with self._lock, torch.inference_mode():
            output = self._model.generate(**inputs, max_new_tokens=self._max_new_tokens, do_sample=False)
        return " ".join(self._processor.batch_decode(output, skip_special_tokens=True)[0].split())

    def analyze(self, img: LoadedImage) -> list[Observation]:
        caption = self.caption(img)
        return [Observation(kind=ObservationKind.CAPTION, text=f"caption: {caption}", source=self.name)] if caption else []


def _load_caption_model(model: str):
    """(processor, model, whether it answers a question) for a captioning or VQA checkpoint."""
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
    asks = architecture in vqa_classes and architecture not in set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    model_class = getattr(transformers, architecture) if asks else AutoModelForImageTextToText
    processor = AutoProcessor.from_pretrained(model, local_files_only=True)
    if getattr(processor, "chat_template", None):
        raise ValueError("chat vision-language models need a conversation, not supported as a captioner")
    loaded = model_class.from_pretrained(model, local_files_only=True).eval()
    if not loaded.can_generate():
        raise ValueError(f"{architecture} picks answers from a fixed list instead of writing text")
    return processor, loaded, asks
