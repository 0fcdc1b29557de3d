"""Decoding images as they look (issue 12, point 6): 16-bit grayscale, EXIF orientation, alpha,
and only the allowed formats. Every file is built here."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from zreward_fast.imaging import BACKGROUND, ImageError, load_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_sixteen_bit_grayscale_png_is_scaled_not_white(tmp_path):
    a = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))
    data = _encode(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    got = np.asarray(load_image(data))
    assert got.shape == (4, 16, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0, :, 0], np.round(a[0] / 257.0).astype(np.uint8))
    assert got[0, 0, 0] == 0 and got[0, 8, 0] == 136 and got[0, -1, 0] == 255  # a ramp, not 255 everywhere
    path = tmp_path / "gray16.png"
    path.write_bytes(data)
    np.testing.assert_array_equal(np.asarray(load_image(path)), got)


def test_exif_orientation_is_applied():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # left half red, right half blue, as stored
    a[:, 20:] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to view
    got = np.asarray(load_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))).astype(int)
    assert got.shape == (40, 20, 3)  # portrait, as it is viewed
    assert got[2, 10, 0] > 200 and got[2, 10, 2] < 60  # the stored left (red) is now on top
    assert got[-3, 10, 2] > 200 and got[-3, 10, 0] < 60
    plain = np.asarray(load_image(_encode(img, "JPEG", quality=95)))
    assert plain.shape == (20, 40, 3)  # no tag: unchanged


def test_transparent_pixels_become_the_documented_background():
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 255  # red everywhere, hidden under alpha 0 on the left half
    a[:, 4:, 3] = 255
    a[:, :4, 3] = 0
    for src in (_encode(Image.fromarray(a, "RGBA"), "PNG"), Image.fromarray(a, "RGBA"), a):
        got = np.asarray(load_image(src))
        assert (got[:, :4] == BACKGROUND).all() and (got[:, 4:] == (255, 0, 0)).all()
    half = a.copy()
    half[..., 3] = 128
    got = np.asarray(load_image(Image.fromarray(half, "RGBA"))).astype(int)
    assert abs(got[0, 0, 0] - 255) <= 1 and abs(got[0, 0, 1] - 127) <= 1  # red over white, half and half
    # palette transparency (a GIF's transparent index) too
    p = Image.fromarray(a[..., :3]).convert("P")
    p.info["transparency"] = p.getpixel((0, 0))
    got = np.asarray(load_image(_encode(p, "PNG")))
    assert (got == BACKGROUND).all()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_allowed_formats_decode(fmt):
    a = np.full((16, 24, 3), (40, 120, 200), np.uint8)
    got = np.asarray(load_image(_encode(Image.fromarray(a), fmt))).astype(int)
    assert got.shape == (16, 24, 3) and np.abs(got - a).max() <= 12


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    got = np.asarray(load_image(data))
    assert (got[..., 0] > 200).all() and (got[..., 2] < 60).all()


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM", "EPS"])
def test_other_formats_are_refused_with_a_clear_error(fmt, tmp_path):
    img = Image.new("RGB", (16, 16), (10, 20, 30))
    if fmt == "EPS":  # written by hand: saving EPS needs no Ghostscript, opening one would run it
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n%%EOF\n"
    else:
        data = _encode(img, fmt)
    with pytest.raises(ImageError, match="PNG, JPEG, WebP, BMP or GIF"):
        load_image(data)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="formats accepted"):
        load_image(path)
