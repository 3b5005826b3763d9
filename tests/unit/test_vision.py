"""Image analyzers: OCR in reading order, faces without false alarms, facts in words, captions."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from chatbot.errors import UserFacingError
from chatbot.perception.images import LoadedImage, load_image
from chatbot.perception.vision import (
    Captioner,
    ImageFacts,
    ObjectDetector,
    PeopleDetector,
    SceneClassifier,
    TextReader,
    load_analyzers,
)

pytestmark = pytest.mark.slow  # loads the real bundled models: not in `pytest -m unit`

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def _font(size: int, bold: bool = True) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")), size)


def _loaded(image: Image.Image, fmt: str = "PNG", **extra) -> LoadedImage:
    return LoadedImage(image=image, format=fmt, width=image.width, height=image.height, **extra)


def _photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with sensor-like noise: photo statistics, no content."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x / width * 180 + 40, y / height * 120 + 60, 230 - x / width * 150], axis=-1)
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _text_page(lines: int = 24, size: int = 26) -> Image.Image:
    page = Image.new("RGB", (1400, 1100), "white")
    draw = ImageDraw.Draw(page)
    words = "the committee agreed to meet again next week and review the budget for spring".split()
    for row in range(lines):
        line = " ".join(words[(row + i) % len(words)] for i in range(11))
        draw.text((60, 40 + row * 42), line, font=_font(size, bold=False), fill="black")
    return page


def _sample_photo(package: str, relative: str) -> Image.Image:
    """A photo shipped inside an installed package (no downloads); skip when it is absent."""
    spec = importlib.util.find_spec(package)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        pytest.skip(f"{package} no longer ships {relative}")
    return Image.open(path).convert("RGB")


@pytest.fixture(scope="module")
def reader() -> TextReader:
    return TextReader()


@pytest.fixture(scope="module")
def detector() -> PeopleDetector:
    return PeopleDetector()


@pytest.fixture(scope="module")
def facts() -> ImageFacts:
    return ImageFacts()


# --- OCR -------------------------------------------------------------------------------------


def test_reads_a_drawn_sign(reader: TextReader):
    sign = Image.new("RGB", (1000, 360), (200, 20, 30))
    ImageDraw.Draw(sign).text((60, 110), "NO PARKING", font=_font(110), fill="white")

    observations = reader.analyze(_loaded(sign))

    assert [o.kind for o in observations] == ["ocr"]
    assert observations[0].text.startswith("the text in it says ")
    assert observations[0].text.lower() == 'the text in it says "no parking"'
    assert observations[0].attachment == ""


def test_lines_come_out_in_reading_order(reader: TextReader):
    board = Image.new("RGB", (1200, 500), "white")
    draw = ImageDraw.Draw(board)
    draw.text((60, 80), "APPLE", font=_font(90), fill="black")
    draw.text((700, 80), "BANANA", font=_font(90), fill="black")
    # The right-hand word sits a little higher: sorting boxes by their top edge alone would read it first.
    draw.text((60, 300), "CHERRY", font=_font(90), fill="black")
    draw.text((700, 285), "GRAPE", font=_font(90), fill="black")

    lines = reader.read_lines(_loaded(board))

    assert [line.lower().split() for line in lines] == [["apple", "banana"], ["cherry", "grape"]]
    assert reader.analyze(_loaded(board))[0].text.lower() == 'the text in it says "apple banana / cherry grape"'


def test_spaces_between_words_are_kept(reader: TextReader):
    # The recogniser often runs English words together on compressed or tightly set text.
    sheet = Image.new("RGB", (1500, 200), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((30, 20), "The committee agreed to meet again next week", font=_font(28, bold=False), fill="black")
    draw.text((30, 110), "BANNER TEXT HERE", font=_font(40), fill="black")
    jpeg = io.BytesIO()
    sheet.save(jpeg, "JPEG", quality=70)

    lines = [line.lower() for line in reader.read_lines(_loaded(Image.open(jpeg).convert("RGB"), "JPEG"))]

    assert lines[1] == "banner text here"
    assert "the committee agreed" in lines[0] and "again next week" in lines[0]


def test_reads_text_on_a_large_photo(reader: TextReader):
    # 4000×3000 is shrunk before OCR; 100 px letters must stay readable.
    photo = _photo_like(4000, 3000)
    ImageDraw.Draw(photo).text((900, 1300), "WELCOME HOME", font=_font(200), fill="white")

    assert "welcome home" in reader.analyze(_loaded(photo, "JPEG"))[0].text.lower()


def test_the_text_detector_sees_a_big_photo_at_a_bounded_size(reader: TextReader, monkeypatch):
    # Its memory grows with the pixels it is given: a 1600×1200 photo went in whole (+360 MB at its peak).
    from chatbot.perception.vision import ocr

    sizes = []
    infer = reader._engine.text_det.infer
    monkeypatch.setattr(reader._engine.text_det, "infer", lambda batch: sizes.append(batch.shape[2:]) or infer(batch))
    page = _text_page()  # 1400×1100, dense 26 px text: still read after the shrink
    lines = reader.read_lines(_loaded(page))
    small = _photo_like(512, 512)  # RapidOCR's own sizing, 736×736, is under the bound (at it: 896×896)
    reader.read_lines(_loaded(small))

    assert sizes[0][0] * sizes[0][1] <= ocr._DETECTOR_PIXELS * 1.05
    assert tuple(sizes[1]) == (736, 736)
    assert sum("committee agreed" in line.lower() for line in lines) >= 6


def test_no_text_found_on_a_plain_photo(reader: TextReader):
    assert reader.analyze(_loaded(_photo_like(800, 600))) == []


def test_long_text_is_shortened(reader: TextReader):
    short = TextReader(max_chars=80)
    text = short.analyze(_loaded(_text_page(lines=6)))[0].text

    assert len(text) <= 80 + len('the text in it says ""')
    assert text.endswith('…"')


# --- faces -----------------------------------------------------------------------------------


def test_no_face_reported_on_text(detector: PeopleDetector):
    assert detector.analyze(_loaded(_text_page())) == []
    glyphs = Image.new("RGB", (1600, 1200), "white")
    draw = ImageDraw.Draw(glyphs)
    for row in range(9):  # eye-like pairs of round glyphs are a classic Haar false positive
        draw.text((20, 20 + row * 130), "OO oo 00 @@ :-) (o_o) ^_^ BOB", font=_font(80), fill="black")
    assert detector.analyze(_loaded(glyphs)) == []


def test_no_face_reported_on_plain_images(detector: PeopleDetector):
    assert detector.analyze(_loaded(_photo_like(1600, 1200))) == []
    assert detector.analyze(_loaded(Image.new("RGB", (640, 480), "navy"))) == []


def test_finds_the_face_in_a_portrait(detector: PeopleDetector):
    astronaut = _sample_photo("skimage", "data/astronaut.png")  # NASA portrait of Eileen Collins

    observations = detector.analyze(_loaded(astronaut))

    assert [(o.kind, o.text) for o in observations] == [("faces", "1 face detected")]


def test_counts_faces_in_a_large_group_photo(detector: PeopleDetector):
    astronaut = _sample_photo("skimage", "data/astronaut.png").resize((700, 700))
    group = _photo_like(4000, 3000)
    for i in range(3):
        group.paste(astronaut, (250 + i * 1200, 1000))

    assert [o.text for o in detector.analyze(_loaded(group, "JPEG"))] == ["3 faces detected"]


def test_finds_a_cat_face_and_not_a_human_one(detector: PeopleDetector):
    cheetah = _sample_photo("gradio", "media_assets/images/cheetah1.jpg")  # a big cat, face on

    assert [(o.kind, o.text) for o in detector.analyze(_loaded(cheetah))] == [("cats", "1 cat face detected")]


def test_page_of_a_book_has_no_faces(detector: PeopleDetector):
    page = _sample_photo("skimage", "data/page.png")  # a photographed page of text

    assert detector.analyze(_loaded(page)) == []


# --- facts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rgb, name", [
    ((220, 20, 30), "red"), ((20, 160, 40), "green"), ((30, 60, 210), "blue"), ((245, 220, 30), "yellow"),
    ((250, 140, 0), "orange"), ((120, 40, 170), "purple"), ((250, 150, 190), "pink"), ((110, 70, 30), "brown"),
    ((255, 255, 255), "white"), ((10, 10, 10), "black"), ((128, 128, 128), "grey"), ((0, 170, 170), "teal"),
])
def test_solid_colour_is_named(facts: ImageFacts, rgb, name):
    text = facts.analyze(_loaded(Image.new("RGB", (300, 200), rgb)))[0].text

    assert text.endswith(f"mostly {name}")


def test_two_main_colours_largest_first(facts: ImageFacts):
    image = Image.new("RGB", (1000, 600), "white")
    image.paste((30, 60, 210), (0, 0, 1000, 400))  # two thirds blue sky

    assert facts.analyze(_loaded(image))[0].text.endswith("mostly blue and white")


def test_size_orientation_and_kind_of_a_photo(facts: ImageFacts):
    observations = facts.analyze(_loaded(_photo_like(1600, 1200), "JPEG"))

    assert [o.kind for o in observations] == ["facts"]
    assert observations[0].text.startswith("1600×1200 (1.9 MP) landscape photo, ")


def test_orientation_words(facts: ImageFacts):
    assert facts.analyze(_loaded(_photo_like(300, 500)))[0].text.startswith("300×500 portrait photo")
    assert facts.analyze(_loaded(_photo_like(400, 400)))[0].text.startswith("400×400 square photo")


def test_white_page_with_text_is_a_document(facts: ImageFacts):
    text = facts.analyze(_loaded(_text_page()))[0].text

    assert "document or page of text" in text
    assert "bright" in text


def test_photographed_page_is_a_document(facts: ImageFacts):
    assert "document" in facts.analyze(_loaded(_sample_photo("skimage", "data/page.png")))[0].text


def test_flat_graphic_is_a_screenshot_or_graphic(facts: ImageFacts):
    screen = Image.new("RGB", (1280, 800), (240, 240, 240))
    draw = ImageDraw.Draw(screen)
    draw.rectangle((0, 0, 1280, 60), fill=(40, 90, 200))
    draw.rectangle((100, 150, 600, 500), fill="white", outline="black")
    draw.ellipse((800, 200, 1100, 500), fill=(230, 80, 40))

    text = facts.analyze(_loaded(screen))[0].text

    assert "screenshot or graphic" in text
    assert "document" not in text and "photo" not in text


def test_real_photo_is_a_photo_not_a_document(facts: ImageFacts):
    text = facts.analyze(_loaded(_sample_photo("skimage", "data/astronaut.png")))[0].text

    assert "photo" in text and "document" not in text


def test_dark_image(facts: ImageFacts):
    assert ", dark, " in facts.analyze(_loaded(_photo_like(400, 300).point(lambda v: v // 5)))[0].text


def test_greyscale_is_mentioned(facts: ImageFacts):
    image = Image.new("RGB", (400, 300), "white")
    image.paste((20, 20, 20), (0, 0, 200, 300))

    assert "black and white (greyscale), mostly black and white" in facts.analyze(_loaded(image))[0].text


def test_exif_facts_become_a_second_note(facts: ImageFacts):
    loaded = _loaded(_photo_like(300, 200), "JPEG", exif={"date_taken": "2024-05-01 14:03", "camera": "Canon EOS 80D"})

    observations = facts.analyze(loaded)

    assert observations[1].text == "taken 2024-05-01 14:03 with a Canon EOS 80D"
    camera_only = facts.analyze(_loaded(_photo_like(30, 20), exif={"camera": "Apple iPhone 12"}))
    assert camera_only[1].text == "taken with an Apple iPhone 12"


def test_animation_is_mentioned(facts: ImageFacts, tmp_path: Path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (40, 40), colour) for colour in ("red", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:])

    assert "GIF with 2 frames (only the first is described)" in facts.analyze(load_image(path))[0].text


@pytest.mark.parametrize("size", [(1, 1), (3000, 2), (2, 3000), (31, 17)])
def test_odd_sizes_do_not_break_any_analyzer(reader, detector, facts, size):
    image = _loaded(Image.new("RGB", size, "white"))
    for analyzer in (reader, detector, facts):
        assert isinstance(analyzer.analyze(image), list)


# --- captions --------------------------------------------------------------------------------

_CAPTION_WORDS = "a an the dog cat on beach sea sky red blue photo of man woman sitting".split()


def _tiny_blip(folder: Path, model_class_name: str) -> Path:
    """A randomly initialised BLIP a few hundred KB in size, saved like a hub checkpoint."""
    import torch
    import transformers
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    (folder / "vocab.txt").write_text("\n".join(specials + _CAPTION_WORDS) + "\n")
    tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        text_config=dict(layers, vocab_size=len(tokenizer), encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id),
        vision_config=dict(layers, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_class_name)(config)
    with torch.no_grad():  # random weights might end at once; make them say some words
        model.text_decoder.cls.predictions.bias[tokenizer.all_special_ids] = -1e4
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    return _tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip", "BlipForConditionalGeneration")


@pytest.fixture(scope="module")
def blip_vqa_dir(tmp_path_factory) -> Path:
    return _tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip-vqa", "BlipForQuestionAnswering")


# A chat template that places each image part where the processor expands it into image tokens.
_CHAT_WITH_IMAGES = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_vlm_dir(tmp_path_factory) -> Path:
    """A randomly initialised LLaVA-layout chat vision-language model (CLIP vision tower, tiny Qwen2 text
    model, chat template), saved like a hub checkpoint: the branch SmolVLM / LLaVA / Qwen2-VL users take."""
    import torch
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from tests.support.tiny_models import build_tiny_causal

    folder = tmp_path_factory.mktemp("models") / "tiny-llava"
    text = build_tiny_causal(folder / "text-model")
    tokenizer = AutoTokenizer.from_pretrained(text)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=_CHAT_WITH_IMAGES, image_token="<image>")
    text_config = AutoConfig.from_pretrained(text)
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=16),
        text_config=text_config, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # wide random weights, so it writes words rather than one token forever
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_chat_vision_language_model_sees_the_photo_and_is_asked_the_users_question(chat_vlm_dir: Path):
    captioner = Captioner(str(chat_vlm_dir))
    assert captioner.wants_question
    asked = []
    generate = captioner._model.generate

    def spy(**inputs):
        asked.append(inputs)
        return generate(**inputs)

    captioner._model.generate = spy
    [note] = captioner.analyze(_loaded(_photo_like(640, 480)), "What colour is the sky?")

    prompt = captioner._processor.tokenizer.decode(asked[0]["input_ids"][0])
    assert "What colour is the sky?" in prompt and prompt.count("<image>") == 16  # the photo as 4×4 patches
    assert asked[0]["pixel_values"].shape[-2:] == (32, 32)
    assert note.text.startswith('an image model asked "What colour is the sky?" answered: ')
    answer = note.text.split("answered: ", 1)[1]
    assert answer and "colour is the sky" not in answer  # the reply alone, not the prompt repeated first


def _caption_words(observations, prefix: str) -> list[str]:
    assert [o.kind for o in observations] == ["caption"]
    text = observations[0].text
    assert text.startswith(prefix), text
    words = text.removeprefix(prefix).split()
    assert words and set(words) <= set(_CAPTION_WORDS)
    return words


def test_captioner_runs_end_to_end(blip_dir: Path):
    captioner = Captioner(blip_dir)

    assert not captioner.wants_question  # captioned once per photo
    _caption_words(captioner.analyze(_loaded(_photo_like(1600, 1200)), "ignored"), "an image model's caption: ")


def test_vqa_model_is_asked_the_users_question(blip_vqa_dir: Path):
    captioner = Captioner(str(blip_vqa_dir))

    assert captioner.wants_question
    photo = _loaded(_photo_like(64, 48))
    _caption_words(captioner.analyze(photo, "What colour is the sky?"),
                   'an image model asked "What colour is the sky?" answered: ')
    _caption_words(captioner.analyze(photo, ""), 'an image model asked "What is in this picture?" answered: ')


def test_the_encoder_asks_each_new_question_and_describes_the_photo_once(blip_vqa_dir: Path, tmp_path: Path):
    from chatbot.perception.encoder import MultimodalEncoder

    class CountingFacts(ImageFacts):
        calls = 0

        def analyze(self, img, question=""):
            CountingFacts.calls += 1
            return super().analyze(img, question)

    encoder = MultimodalEncoder(tmp_path / "media", analyzers=[Captioner(blip_vqa_dir), CountingFacts()])
    photo = tmp_path / "IMG_0001.png"
    _photo_like(64, 48).save(photo)
    first = encoder.encode("Is there a dog?", [photo])
    second = encoder.encode("What colour is the sky?", [photo])
    again = encoder.encode("Is there a dog?", [photo])

    def asked(turn):
        return [o.text.split(" answered")[0] for o in turn.observations if o.kind == "caption"]

    assert asked(first) == ['an image model asked "Is there a dog?"']
    assert asked(second) == ['an image model asked "What colour is the sky?"']
    assert again.observations == first.observations
    assert CountingFacts.calls == 1  # the question-free analysers ran once for this content


@pytest.mark.parametrize("model", ["no-such-org/no-such-captioner", "/nonexistent/folder"])
def test_bad_caption_model_raises_user_facing_error(model: str):
    with pytest.raises(UserFacingError, match="no-such-captioner|/nonexistent/folder"):
        Captioner(model)


def test_folder_without_a_model_raises_user_facing_error(tmp_path: Path):
    (tmp_path / "config.json").write_text("{not json")

    with pytest.raises(UserFacingError, match="could not be loaded"):
        Captioner(tmp_path)


def test_load_analyzers_default_and_with_captioner(blip_dir: Path):
    assert [type(a) for a in load_analyzers()] == [SceneClassifier, ObjectDetector, TextReader, PeopleDetector, ImageFacts]
    assert isinstance(load_analyzers(str(blip_dir))[-1], Captioner)
    with pytest.raises(UserFacingError, match="no-such-captioner"):
        load_analyzers("no-such-org/no-such-captioner")
