"""Decoding of every Pillow mode, EXIF orientation, animations and broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdul_server.decode import BACKGROUND_RGB, DecodeError, decode_image

MAX_PIXELS = 40_000_000

# Each odd image either decodes to RGB or fails with exactly this reason.
ODD_IMAGE_REJECTIONS = {
    "broken.png": "unidentified",
    "decompression_bomb.gif": "too_many_pixels",
    "truncated_jpeg.jpg": "truncated",
}


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    decoded = decode_image(data, MAX_PIXELS)
    assert decoded.image.mode == "RGB"
    return np.asarray(decoded.image, dtype=np.int32)


@pytest.mark.parametrize(
    "name",
    [
        "app13-multiple.jpg",
        "broken.png",
        "chi.gif",
        "decompression_bomb.gif",
        "hopper.jpg",
        "hopper_bw_500.png",
        "hopper_gray.jpg",
        "hopper_orientation_6.jpg",
        "i_trns.png",
        "pil_sample_cmyk.jpg",
        "pil_sample_rgb.jpg",
        "pngsuite_basn2c16.png",
        "transparent.png",
        "truncated_jpeg.jpg",
        "uncompressed_la.png",
    ],
)
def test_odd_image_decoded_or_rejected(shared_data: Path, name: str) -> None:
    data = (shared_data / "odd-images" / name).read_bytes()
    if name in ODD_IMAGE_REJECTIONS:
        with pytest.raises(DecodeError) as caught:
            decode_image(data, MAX_PIXELS)
        assert caught.value.reason == ODD_IMAGE_REJECTIONS[name]
        assert str(caught.value)
        return
    decoded = decode_image(data, MAX_PIXELS)
    assert decoded.image.mode == "RGB"
    assert np.asarray(decoded.image).dtype == np.uint8
    assert decoded.width > 0
    assert decoded.height > 0


def test_odd_images_folder_fully_covered(shared_data: Path) -> None:
    names = {p.name for p in (shared_data / "odd-images").iterdir() if p.suffix != ".md"}
    covered = set(ODD_IMAGE_REJECTIONS) | {
        "app13-multiple.jpg", "chi.gif", "hopper.jpg", "hopper_bw_500.png", "hopper_gray.jpg",
        "hopper_orientation_6.jpg", "i_trns.png", "pil_sample_cmyk.jpg", "pil_sample_rgb.jpg",
        "pngsuite_basn2c16.png", "transparent.png", "uncompressed_la.png",
    }  # fmt: skip
    assert names == covered


def test_cmyk_matches_rgb_rendering(shared_data: Path) -> None:
    cmyk = _pixels((shared_data / "odd-images" / "pil_sample_cmyk.jpg").read_bytes())
    rgb = _pixels((shared_data / "odd-images" / "pil_sample_rgb.jpg").read_bytes())
    assert cmyk.shape == rgb.shape
    # Both are lossy JPEGs of one picture. Inverted CMYK is 184 levels off on this pair.
    assert np.abs(cmyk - rgb).mean() < 8.0


def test_exif_orientation_applied(shared_data: Path) -> None:
    upright = _pixels((shared_data / "odd-images" / "hopper.jpg").read_bytes())
    stored_rotated = (shared_data / "odd-images" / "hopper_orientation_6.jpg").read_bytes()
    raw = np.asarray(Image.open(io.BytesIO(stored_rotated)).convert("RGB"), dtype=np.int32)
    fixed = _pixels(stored_rotated)
    assert np.abs(fixed - upright).mean() < 10.0
    assert np.abs(raw - upright).mean() > 3 * np.abs(fixed - upright).mean()


def test_sixteen_bit_gray_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896], [65535, 1000, 65280]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    pixels = _pixels(_encode(image, "PNG"))
    expected = np.rint(values / 257.0).astype(np.int32)
    np.testing.assert_array_equal(pixels[:, :, 0], expected)
    np.testing.assert_array_equal(pixels[:, :, 0], pixels[:, :, 2])


def test_sixteen_bit_transparency_composited(shared_data: Path) -> None:
    data = (shared_data / "odd-images" / "i_trns.png").read_bytes()
    source = np.asarray(Image.open(io.BytesIO(data)), dtype=np.int64)
    pixels = _pixels(data)
    transparent = source == 255
    assert transparent.any()
    assert (pixels[transparent] == BACKGROUND_RGB).all()
    # Opaque samples are at most 254 of 65535: almost black once scaled.
    assert pixels[~transparent].max() <= 1


def test_rgba_and_la_composited_on_background() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    pixels = _pixels(_encode(rgba, "PNG"))
    assert tuple(pixels[0, 0]) == (0, 0, 255)
    assert tuple(pixels[1, 1]) == BACKGROUND_RGB
    la = Image.new("LA", (2, 2), (10, 255))
    la.putpixel((1, 1), (10, 0))
    pixels = _pixels(_encode(la, "PNG"))
    assert tuple(pixels[0, 0]) == (10, 10, 10)
    assert tuple(pixels[1, 1]) == BACKGROUND_RGB


def test_palette_transparency_and_one_bit() -> None:
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1, 0])
    pixels = _pixels(_encode(palette, "PNG", transparency=0))
    assert tuple(pixels[0, 1]) == (0, 255, 0)
    assert tuple(pixels[0, 0]) == BACKGROUND_RGB
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    pixels = _pixels(_encode(bilevel, "PNG"))
    assert tuple(pixels[0, 0]) == (0, 0, 0)
    assert tuple(pixels[0, 1]) == (255, 255, 255)


def test_animation_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    pixels = _pixels(data)
    assert pixels[..., 0].min() > 200
    assert pixels[..., 2].max() < 50


def test_pixel_bound_rejects_before_decoding() -> None:
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(DecodeError) as caught:
        decode_image(data, max_pixels=9_999)
    assert caught.value.reason == "too_many_pixels"
    assert "--max-pixels" in str(caught.value)
    assert decode_image(data, max_pixels=10_000).width == 100


def test_empty_and_garbage_rejected() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_image(b"", MAX_PIXELS)
    assert caught.value.reason == "empty"
    with pytest.raises(DecodeError) as caught:
        decode_image(b"not an image at all", MAX_PIXELS)
    assert caught.value.reason == "unidentified"


def _large_photo_jpeg() -> tuple[bytes, np.ndarray]:
    """A smooth 1600 x 1200 JPEG and its full decode."""
    y, x = np.mgrid[0:1200, 0:1600]
    rgb = np.stack([x * 255 // 1600, y * 255 // 1200, (x + y) * 255 // 2800], axis=-1)
    data = _encode(Image.fromarray(rgb.astype(np.uint8)), "JPEG", quality=90)
    return data, _pixels(data)


@pytest.mark.parametrize(("min_side", "size"), [(300, (400, 300)), (301, (800, 600))])
def test_large_jpeg_decoded_at_reduced_scale(min_side: int, size: tuple[int, int]) -> None:
    data, full = _large_photo_jpeg()
    decoded = decode_image(data, MAX_PIXELS, min_side=min_side)
    assert decoded.image.size == size
    # The DCT-scaled decode matches a full decode that is then downscaled.
    reference = Image.fromarray(full.astype(np.uint8)).resize(size, Image.Resampling.BOX)
    diff = np.abs(np.asarray(decoded.image, dtype=np.int32) - np.asarray(reference, np.int32))
    assert diff.mean() < 2.0


def test_draft_leaves_small_jpegs_and_other_formats_alone() -> None:
    data, full = _large_photo_jpeg()
    # A shorter side under twice the needed side: decoded in full.
    assert decode_image(data, MAX_PIXELS, min_side=601).image.size == (1600, 1200)
    png = _encode(Image.fromarray(full.astype(np.uint8)), "PNG")
    assert decode_image(png, MAX_PIXELS, min_side=100).image.size == (1600, 1200)


def test_draft_keeps_exif_orientation(shared_data: Path) -> None:
    stored_rotated = (shared_data / "odd-images" / "hopper_orientation_6.jpg").read_bytes()
    upright = decode_image((shared_data / "odd-images" / "hopper.jpg").read_bytes(), MAX_PIXELS)
    drafted = decode_image(stored_rotated, MAX_PIXELS, min_side=32).image
    assert drafted.size == (32, 32)
    reference = upright.image.resize(drafted.size, Image.Resampling.BOX)
    diff = np.abs(np.asarray(drafted, np.int32) - np.asarray(reference, np.int32))
    assert diff.mean() < 10.0
