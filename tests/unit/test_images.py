"""load_image: every supported format and pixel mode becomes upright RGB; bad files get friendly errors."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from chatbot.errors import UserFacingError
from chatbot.perception.images import load_image

RED, BLUE = (220, 30, 40), (20, 60, 200)


def _close(pixel, expected, tolerance=12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


def _assert_friendly(message: str) -> None:
    assert message and message[-1] in ".?"
    for leak in ("Traceback", "Error", "Exception", "PIL", "/tmp", "File \""):
        assert leak not in message


@pytest.mark.parametrize("fmt, suffix", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"),
                                         ("BMP", "bmp"), ("TIFF", "tiff")])
def test_each_format_loads_as_rgb(tmp_path: Path, fmt: str, suffix: str):
    path = tmp_path / f"photo.{suffix}"
    Image.new("RGB", (64, 48), RED).save(path, fmt)

    loaded = load_image(path)

    assert loaded.format == fmt
    assert loaded.image.mode == "RGB"
    assert (loaded.width, loaded.height) == (64, 48) == loaded.image.size
    assert _close(loaded.image.getpixel((32, 24)), RED, tolerance=20)  # GIF palettes and JPEG are lossy
    assert loaded.exif == {}
    assert loaded.frames == 1


def test_wrong_extension_is_ignored(tmp_path: Path):
    path = tmp_path / "actually_a_png.jpg"
    Image.new("RGB", (10, 20), BLUE).save(path, "PNG")

    loaded = load_image(path)

    assert loaded.format == "PNG"
    assert loaded.image.getpixel((5, 5)) == BLUE


def test_animated_gif_uses_first_frame_and_counts_frames(tmp_path: Path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (30, 30), colour) for colour in (RED, BLUE, (0, 160, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)

    loaded = load_image(path)

    assert loaded.frames == 3
    assert _close(loaded.image.getpixel((15, 15)), RED, tolerance=20)


def test_exif_orientation_is_applied(tmp_path: Path):
    stored = Image.new("RGB", (60, 40), BLUE)
    stored.paste(RED, (0, 0, 10, 10))  # marks the stored top-left corner
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)

    loaded = load_image(path)

    assert (loaded.width, loaded.height) == (40, 60)
    assert _close(loaded.image.getpixel((35, 4)), RED)  # top-left went to top-right
    assert _close(loaded.image.getpixel((4, 4)), BLUE)


def test_exif_date_taken_and_camera(tmp_path: Path):
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Canon"
    exif[ExifTags.Base.Model] = "Canon EOS 80D"
    exif[ExifTags.Base.DateTime] = "2030:01:01 00:00:00"  # last edited: not when it was taken
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "2024:05:01 14:03:22"
    path = tmp_path / "camera.jpg"
    Image.new("RGB", (20, 20), RED).save(path, exif=exif)

    assert load_image(path).exif == {"date_taken": "2024-05-01 14:03", "camera": "Canon EOS 80D"}


def test_exif_camera_make_not_repeated_in_model_gets_prefixed(tmp_path: Path):
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Apple"
    exif[ExifTags.Base.Model] = "iPhone 12"
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (20, 20), RED).save(path, exif=exif)

    assert load_image(path).exif == {"camera": "Apple iPhone 12"}


def test_palette_with_transparency_goes_onto_white(tmp_path: Path):
    image = Image.new("P", (20, 10), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * (254 * 3))
    image.paste(1, (10, 0, 20, 10))  # right half red, left half index 0 = transparent black
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)

    loaded = load_image(path).image

    assert loaded.getpixel((2, 5)) == (255, 255, 255)
    assert loaded.getpixel((15, 5)) == RED


def test_alpha_is_composited_onto_white(tmp_path: Path):
    pixels = np.zeros((10, 30, 4), dtype=np.uint8)
    pixels[:, :10] = (*RED, 0)  # fully transparent: white shows
    pixels[:, 10:20] = (*BLUE, 255)  # opaque
    pixels[:, 20:] = (0, 0, 0, 128)  # half-transparent black: mid grey
    path = tmp_path / "alpha.png"
    Image.fromarray(pixels, "RGBA").save(path)

    loaded = load_image(path).image

    assert loaded.getpixel((5, 5)) == (255, 255, 255)
    assert loaded.getpixel((15, 5)) == BLUE
    assert _close(loaded.getpixel((25, 5)), (127, 127, 127), tolerance=2)


def test_grey_with_alpha(tmp_path: Path):
    path = tmp_path / "la.png"
    Image.new("LA", (8, 8), (0, 0)).save(path)

    assert load_image(path).image.getpixel((4, 4)) == (255, 255, 255)


@pytest.mark.parametrize("fmt, suffix", [("JPEG", "jpg"), ("TIFF", "tif")])
def test_cmyk_becomes_rgb(tmp_path: Path, fmt: str, suffix: str):
    path = tmp_path / f"cmyk.{suffix}"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, fmt)  # no cyan, full magenta+yellow = red

    loaded = load_image(path).image

    assert loaded.mode == "RGB"
    assert _close(loaded.getpixel((8, 8)), (255, 0, 0), tolerance=20)


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("TIFF", "tif")])
def test_16_bit_grey_is_scaled_to_8_bit(tmp_path: Path, fmt: str, suffix: str):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / f"deep.{suffix}"
    Image.fromarray(values).save(path, fmt)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file

    loaded = load_image(path).image

    assert loaded.mode == "RGB"
    assert [loaded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_32_bit_integer_mode(tmp_path: Path):
    path = tmp_path / "int32.tif"
    Image.fromarray(np.array([[0, 100, 200]], dtype=np.int32), "I").save(path)  # 8-bit values in 32 bits

    loaded = load_image(path).image

    assert [loaded.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 200]


def test_float_image_in_unit_range(tmp_path: Path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(path)

    assert [load_image(path).image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize("mode", ["1", "L"])
def test_black_and_white_modes(tmp_path: Path, mode: str):
    path = tmp_path / f"{mode}.png"
    Image.new(mode, (8, 8), 1 if mode == "1" else 200).save(path)

    assert load_image(path).image.getpixel((1, 1)) == ((255,) * 3 if mode == "1" else (200,) * 3)


# --- files that must be refused ------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width`×`height` but holds almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _refusal(path: Path, **limits) -> str:
    with pytest.raises(UserFacingError) as caught:
        load_image(path, **limits)
    message = str(caught.value)
    _assert_friendly(message)
    return message


def test_too_many_bytes(tmp_path: Path):
    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(path)

    message = _refusal(path, max_bytes=10_000)

    assert "too big" in message and "10 KB" in message


@pytest.mark.parametrize("width, height", [(8000, 6000), (10_000, 10_000), (100_000, 100_000)])
def test_pixel_bomb_header_refused_before_decoding(tmp_path: Path, width: int, height: int):
    # 48 MP trips our own cap; 100 MP is where Pillow warns, 10 GP where Pillow itself refuses.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(width, height))

    message = _refusal(path)

    assert "megapixels" in message  # not "damaged": the pixels were never decoded


def test_pixel_cap_applies_to_real_images(tmp_path: Path):
    path = tmp_path / "blank.png"
    Image.new("RGB", (2000, 1000), "white").save(path)

    assert "2000×1000" in _refusal(path, max_pixels=1_000_000)
    assert load_image(path, max_pixels=2_000_000).width == 2000


def test_text_file_is_not_an_image(tmp_path: Path):
    path = tmp_path / "notes.jpg"
    path.write_text("Dear diary, today I attached a text file.")

    assert "doesn't look like an image" in _refusal(path)


def test_truncated_jpeg(tmp_path: Path):
    path = tmp_path / "half.jpg"
    noisy = np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    assert "damaged or incomplete" in _refusal(path)


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")

    assert "empty" in _refusal(path)


def test_missing_file(tmp_path: Path):
    _refusal(tmp_path / "gone.jpg")


def test_unsupported_format_is_refused(tmp_path: Path):
    path = tmp_path / "drawing.ico"
    Image.new("RGB", (16, 16), RED).save(path, "ICO")

    assert "doesn't look like an image" in _refusal(path)
