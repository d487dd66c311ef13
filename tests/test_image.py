"""Tiling must equal InternVL's algorithm (docs/design/tiling.md) and transformers' image processor."""

import inspect
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ivl.image import (
    ImageError,
    best_grid,
    dynamic_tiles,
    frames_to_tiles,
    image_to_pixel_values,
    num_tiles_for,
    open_image,
    sample_frame_indices,
    tiles_per_image,
    to_rgb,
)


def reference_grid(width, height, min_num, max_num, image_size):
    """transformers' own grid choice for InternVL (GotOcr2's `get_optimal_tiled_canvas`), on the same inputs."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    return get_optimal_tiled_canvas((height, width), (image_size, image_size), min_num, max_num)


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_best_grid_matches_reference_on_thousands_of_sizes():
    rng = random.Random(1234)
    for _ in range(5000):
        width, height = rng.randint(1, 5000), rng.randint(1, 5000)
        low = rng.randint(1, 6)
        high = rng.randint(low, 40)
        size = rng.choice([224, 448])
        assert best_grid(width, height, low, high, size) == reference_grid(width, height, low, high, size)


def test_best_grid_tie_rule_and_spec_example():
    assert best_grid(800, 1300) == (2, 3)
    # Square images tie between 1x1, 2x2, 3x3: the larger grid wins only when the image is big enough.
    assert best_grid(448, 448) == (1, 1)
    assert best_grid(700, 700) == (2, 2)  # 490000 > 0.5 * 448^2 * 4
    assert best_grid(1000, 1000) == (3, 3)  # 1e6 > 0.5 * 448^2 * 9 = 903168
    assert best_grid(900, 900) == (2, 2)  # 810000 < 903168: stays at 2x2


@pytest.mark.parametrize(
    "width, height, expected",
    [
        # min 3, max 4: candidates by tile count 1x3, 3x1 (3 tiles), then 1x4, 2x2, 4x1 (4 tiles). Aspect 2 is 1 away
        # from both 3x1 and 2x2; 2x2 comes later (more tiles) and wins when the area > 0.5 * 448^2 * 4 = 401,408.
        (1000, 500, (2, 2)),
        (700, 350, (3, 1)),  # 245,000: the earlier 3x1 stays
        (896, 448, (3, 1)),  # exactly 401,408: not more than half, so the earlier 3x1 stays (a strict comparison)
    ],
)
def test_an_exact_tie_goes_to_the_grid_with_more_tiles_only_for_a_large_enough_image(width, height, expected):
    assert best_grid(width, height, 3, 4, 448) == expected
    assert reference_grid(width, height, 3, 4, 448) == expected


def test_best_grid_matches_transformers_on_every_exact_tie_with_three_or_more_tiles():
    """Images whose aspect ratio lies exactly midway between the ratios of two grids of different tile counts (a tie
    the order by tile count decides), at a small and a large area, for tile bounds that exclude 1 and 2 tiles.
    (Between grids of the same count, e.g. 2x2 and 4x1 at aspect 2.5, InternVL's order is its set's iteration order,
    which the kit keeps and transformers' processor does not.)"""
    checked = 0
    for low in range(3, 7):
        for high in range(low, 13):
            grids = {(i, j) for i in range(1, high + 1) for j in range(1, high + 1) if low <= i * j <= high}
            for a, b in {
                (g, h) for g in grids for h in grids if g[0] * h[1] < h[0] * g[1] and g[0] * g[1] != h[0] * h[1]
            }:
                width, height = a[0] * b[1] + b[0] * a[1], 2 * a[1] * b[1]  # width / height = the two ratios' mean
                for scale in (1, 300):
                    args = (width * scale, height * scale, low, high, 448)
                    assert best_grid(*args) == reference_grid(*args), args
                    checked += 1
    assert checked > 1000


def test_spec_example_tiles_and_crops_equal_reference_crop():
    image = random_image(800, 1300)
    tiles = dynamic_tiles(image)
    assert len(tiles) == 7 and all(tile.size == (448, 448) for tile in tiles)
    resized = np.asarray(image.resize((896, 1344), Image.Resampling.BICUBIC))
    for index, tile in enumerate(tiles[:6]):
        row, col = divmod(index, 2)  # row-major order
        expected = resized[row * 448 : (row + 1) * 448, col * 448 : (col + 1) * 448]
        assert np.array_equal(np.asarray(tile), expected)
    thumbnail = np.asarray(image.resize((448, 448), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(tiles[6]), thumbnail)
    assert num_tiles_for(800, 1300) == 7


def test_single_tile_has_no_thumbnail_and_thumbnail_can_be_disabled():
    assert len(dynamic_tiles(random_image(448, 448))) == 1
    assert len(dynamic_tiles(random_image(800, 1300), use_thumbnail=False)) == 6


@pytest.mark.parametrize(
    ("width", "height", "min_tiles", "max_tiles"),
    [(800, 1300, 1, 12), (1920, 1080, 1, 6), (300, 200, 1, 12), (2000, 500, 2, 8), (640, 480, 1, 1)],
)
def test_pixel_values_agree_with_transformers_image_processor(width, height, min_tiles, max_tiles):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    processor = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=min_tiles,
        max_patches=max_tiles,
        size={"height": 448, "width": 448},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    image = random_image(width, height, seed=width)
    expected = processor(images=image, return_tensors="pt")["pixel_values"]
    ours = image_to_pixel_values(image, min_tiles=min_tiles, max_tiles=max_tiles)
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    difference = (ours - expected).abs()
    assert difference.max().item() <= 0.1
    assert difference.mean().item() <= 1e-3


def test_jpeg_augmentation_is_seedable_per_tile_and_changes_pixels():
    image = random_image(900, 500, seed=3)
    plain = image_to_pixel_values(image, max_tiles=6)
    first = image_to_pixel_values(image, max_tiles=6, jpeg_augment=True, rng=np.random.default_rng(7))
    again = image_to_pixel_values(image, max_tiles=6, jpeg_augment=True, rng=np.random.default_rng(7))
    other = image_to_pixel_values(image, max_tiles=6, jpeg_augment=True, rng=np.random.default_rng(8))
    assert first.shape == plain.shape
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert (first - plain).abs().mean() > 0.01


def test_multi_image_budget_and_video_frames():
    assert tiles_per_image(12, 1) == 12
    assert tiles_per_image(12, 5) == 2
    assert tiles_per_image(6, 10) == 1
    frames = [random_image(320, 240, seed=i) for i in range(3)]
    assert frames_to_tiles(frames).shape == (3, 3, 448, 448)
    assert sample_frame_indices(100, 8) == [6, 18, 31, 43, 56, 68, 81, 93]
    assert sample_frame_indices(5, 8) == [0, 1, 2, 3, 4]


def test_open_image_refuses_missing_unreadable_and_oversized(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        open_image(tmp_path / "missing.png")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="unreadable"):
        open_image(broken)
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    with pytest.raises(ImageError, match="too large"):
        open_image(big, max_pixels=300 * 299)
    assert open_image(big).size == (300, 300)


def images_of_every_mode(folder):
    """{name: path} of files in every PIL mode a user's data holds, with random pixels and (where the mode has one)
    random transparency, saved and reopened so the file's own mode and transparency info are what is read."""
    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    gray, alpha = rgb[..., 0], rng.integers(0, 256, (37, 53), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(32)
    images = {
        "1": Image.fromarray(gray > 127),
        "L": Image.fromarray(gray),
        "P": palette,
        "RGB": Image.fromarray(rgb),
        "LA": Image.fromarray(np.dstack([gray, alpha]), "LA"),
        "RGBA": Image.fromarray(np.dstack([rgb, alpha])),
    }
    paths = {}
    for name, image in images.items():
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    palette.save(folder / "P_transparent.png", transparency=5)  # tRNS: palette entry 5 is transparent
    Image.fromarray(gray).save(folder / "L_transparent.png", transparency=int(gray[0, 0]))  # tRNS: one gray level
    Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8), "CMYK").save(folder / "CMYK.tiff")
    for name in ("P_transparent", "L_transparent"):
        paths[name] = folder / f"{name}.png"
    paths["CMYK"] = folder / "CMYK.tiff"
    return paths


def transformers_rgb(image: Image.Image) -> np.ndarray:
    """transformers' own conversion to RGB (`image_transforms.convert_to_rgb`, what its processors feed on), as an
    array; transformers 5.17's takes no `return_numpy` and returns the PIL image."""
    from transformers.image_transforms import convert_to_rgb

    if "return_numpy" in inspect.signature(convert_to_rgb).parameters:
        return convert_to_rgb(image, return_numpy=True)
    return np.asarray(convert_to_rgb(image))


# transformers 5.17 (our floor) converts a transparent image with PIL's plain `convert("RGB")`, keeping whatever colour
# lies under a transparent pixel; later releases composite onto white, as the kit does on every version. Probed, not
# read from the version number: one fully transparent black pixel.
TRANSFORMERS_COMPOSITES_ONTO_WHITE = transformers_rgb(Image.new("RGBA", (1, 1))).tolist() == [[[255, 255, 255]]]
NEEDS_COMPOSITING = pytest.mark.skipif(
    not TRANSFORMERS_COMPOSITES_ONTO_WHITE,
    reason="this transformers (5.17) does not composite transparency onto white, so its processor cannot agree with "
    "the kit on transparent pixels",
)
OPAQUE = ("1", "L", "P", "RGB", "CMYK")
TRANSPARENT = ("LA", "RGBA", "P_transparent", "L_transparent")


@pytest.mark.parametrize("name", [*OPAQUE, *(pytest.param(name, marks=NEEDS_COMPOSITING) for name in TRANSPARENT)])
def test_every_pil_mode_converts_exactly_as_transformers_processor_does(tmp_path, name):
    path = images_of_every_mode(tmp_path)[name]
    with Image.open(path) as image:
        assert image.mode == name.split("_")[0], (name, image.mode)
        expected = transformers_rgb(image)  # what the processor feeds on at inference
        in_memory = np.asarray(to_rgb(image))
    assert np.array_equal(np.asarray(open_image(path)), expected), name
    assert np.array_equal(in_memory, expected), name


def test_transparent_pixels_are_composited_onto_white(tmp_path):
    path = images_of_every_mode(tmp_path)["RGBA"]
    with Image.open(path) as image:
        rgba = np.asarray(image)
    alpha, rgb = rgba[..., 3:].astype(np.float64) / 255, rgba[..., :3].astype(np.float64)
    ours = np.asarray(open_image(path)).astype(np.float64)
    assert (ours[alpha[..., 0] == 0] == 255).all()  # transparent pixels are white, not black
    assert np.abs(ours - (rgb * alpha + 255 * (1 - alpha))).max() <= 1  # PIL's alpha_composite rounds


def with_transparent_gray(png, level: int) -> None:
    """Mark one gray level of grayscale PNG `png` transparent: a tRNS chunk before the image data, written by hand
    because Pillow 10.0 cannot save transparency for 16-bit gray."""
    data = png.read_bytes()
    at = data.index(b"IDAT") - 4  # the chunk starts with its 4-byte length
    body = b"tRNS" + struct.pack(">H", level)
    png.write_bytes(data[:at] + struct.pack(">I", 2) + body + struct.pack(">I", zlib.crc32(body)) + data[at:])


def test_sixteen_bit_grayscale_is_scaled_not_clipped_to_white(tmp_path):
    """transformers' conversion (PIL's `convert("RGB")`) clips 16-bit gray at 255, so a 16-bit PNG becomes almost all
    white; the kit scales it to 8 bits instead: round(v / 257), v in 0..65535."""
    values = np.random.default_rng(3).integers(0, 65536, (29, 31), dtype=np.uint16)
    values[0, :3] = (0, 128, 65535)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")  # Pillow 10.0 opens a 16-bit PNG as 32-bit `I`
        clipped = transformers_rgb(image)
    assert (clipped == 255).mean() > 0.99  # transformers' result: the image is lost
    expected = np.round(values / 257).astype(np.uint8)
    ours = np.asarray(open_image(path))
    assert np.array_equal(ours, np.repeat(expected[..., None], 3, axis=-1))
    assert ours[0, :3, 0].tolist() == [0, 0, 255]
    with_transparent_gray(path, int(values[5, 5]))  # a transparent 16-bit level: white
    assert (np.asarray(open_image(path))[values == values[5, 5]] == 255).all()
    assert np.array_equal(np.asarray(open_image(path))[values != values[5, 5]][:, 0], expected[values != values[5, 5]])


@NEEDS_COMPOSITING
def test_transparent_image_pixel_values_agree_with_transformers_image_processor(tmp_path):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    processor = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=6,
                                         size={"height": 448, "width": 448}, image_mean=[0.485, 0.456, 0.406],
                                         image_std=[0.229, 0.224, 0.225])  # fmt: skip
    rng = np.random.default_rng(4)
    rgba = Image.fromarray(np.dstack([rng.integers(0, 256, (300, 500, 3)), np.zeros((300, 500))]).astype(np.uint8))
    expected = processor(images=rgba, return_tensors="pt")["pixel_values"]
    ours = image_to_pixel_values(rgba, max_tiles=6)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 0.1
