"""Regenerate the sample images and masks in this folder (procedural, no downloads).

    python -m train.samples.make_samples          # writes next to this file
    python train/samples/make_samples.py [OUT_DIR]

Every picture is a pure function of a fixed seed: numpy's PCG64 generator, Pillow
drawing and resizing, and Pillow's JPEG encoder (bytes can differ across libjpeg
versions; pixels barely). The scenes mimic the things inpainting has to continue:
smooth gradients, hard edges, repeating texture, fine noise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 256
HERE = Path(__file__).resolve().parent


def _noise(rng: np.random.Generator, size: int, octaves: int = 5, base: int = 4) -> np.ndarray:
    """Fractal value noise in [0, 1], ``size x size``: smooth random grids of rising
    frequency and falling weight, summed."""
    total = np.zeros((size, size), np.float32)
    weight, norm = 1.0, 0.0
    for octave in range(octaves):
        cells = base * 2**octave
        grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
        total += weight * np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC))
        norm += weight
        weight *= 0.5
    total /= norm
    return (total - total.min()) / (total.max() - total.min() + 1e-8)


def _to_image(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def _vertical(size: int, top, bottom) -> np.ndarray:
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    return np.broadcast_to((1 - t) * np.array(top) + t * np.array(bottom), (size, size, 3)).copy()


def landscape(rng: np.random.Generator) -> Image.Image:
    """Sky gradient, sun, two mountain ridges, a lake with a rippled reflection."""
    s = SIZE
    img = _vertical(s, (0.35, 0.55, 0.85), (0.95, 0.80, 0.65))
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    sun = np.exp(-((xx - 0.7 * s) ** 2 + (yy - 0.3 * s) ** 2) / (2 * (0.06 * s) ** 2))
    img += sun[..., None] * np.array([0.6, 0.45, 0.2])
    for base, amp, colour, seed_shift in ((0.45, 0.18, (0.35, 0.38, 0.5), 0), (0.58, 0.12, (0.2, 0.32, 0.2), 1)):
        ridge = _noise(rng, s, octaves=6, base=2)[seed_shift * 7 % s]
        height = (base - amp * ridge) * s
        below = yy > height[None, :]
        shade = 0.85 + 0.3 * _noise(rng, s, octaves=4, base=8)
        img[below] = (np.array(colour) * shade[..., None])[below]
    horizon = int(0.7 * s)
    reflection = img[horizon - 1 :: -1][: s - horizon]
    ripple = (np.sin(np.arange(s - horizon) * 1.3)[:, None] * 2).astype(int)
    cols = (np.arange(s)[None, :] + ripple) % s
    reflection = reflection[np.arange(s - horizon)[:, None], cols]
    img[horizon:] = 0.6 * reflection + 0.4 * np.array([0.15, 0.3, 0.45])
    img += rng.normal(0.0, 0.015, img.shape)
    return _to_image(img)


def bricks(rng: np.random.Generator) -> Image.Image:
    """A brick wall: staggered rows, per-brick colour, mortar, grain."""
    s, bh, bw = SIZE, 20, 44
    img = np.empty((s, s, 3), np.float32)
    img[:] = (0.72, 0.70, 0.66)  # mortar
    for row in range(s // bh + 1):
        offset = (bw // 2) * (row % 2)
        for col in range(-1, s // bw + 2):
            x0, y0 = col * bw - offset + 2, row * bh + 2
            colour = np.array((0.62, 0.26, 0.18)) * rng.uniform(0.75, 1.15) + rng.normal(0, 0.03, 3)
            img[max(y0, 0) : max(y0 + bh - 4, 0), max(x0, 0) : max(x0 + bw - 4, 0)] = colour
    img *= (0.8 + 0.35 * _noise(rng, s, octaves=5, base=16))[..., None]
    img += rng.normal(0.0, 0.02, img.shape)
    return _to_image(img)


def still_life(rng: np.random.Generator) -> Image.Image:
    """Shaded spheres on a table against a wall, with soft shadows."""
    s = SIZE
    img = _vertical(s, (0.82, 0.78, 0.70), (0.60, 0.55, 0.48))
    table = int(0.62 * s)
    img[table:] = _vertical(s, (0.45, 0.30, 0.20), (0.30, 0.20, 0.12))[: s - table]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    light = np.array([-0.5, -0.6, 0.62])
    light /= np.linalg.norm(light)
    spheres = ((70, 150, 38, (0.8, 0.15, 0.1)), (150, 140, 50, (0.2, 0.45, 0.8)), (205, 170, 24, (0.9, 0.8, 0.2)))
    for cx, cy, r, colour in spheres:
        shadow = np.exp(-(((xx - cx - 0.5 * r) / (1.3 * r)) ** 2 + ((yy - cy - 0.9 * r) / (0.3 * r)) ** 2))
        img *= (1 - 0.5 * shadow)[..., None]
        dx, dy = (xx - cx) / r, (yy - cy) / r
        inside = dx**2 + dy**2 < 1
        dz = np.sqrt(np.clip(1 - dx**2 - dy**2, 0, 1))
        lambert = np.clip(dx * light[0] + dy * light[1] + dz * light[2], 0, 1)
        spec = lambert**40
        shaded = np.array(colour) * (0.25 + 0.75 * lambert)[..., None] + spec[..., None] * 0.6
        img[inside] = shaded[inside]
    img += rng.normal(0.0, 0.01, img.shape)
    return _to_image(img)


def clouds(rng: np.random.Generator) -> Image.Image:
    """Fractal cumulus over a blue sky."""
    cover = np.clip((_noise(rng, SIZE, octaves=7, base=3) - 0.45) * 2.5, 0.0, 1.0)
    sky = _vertical(SIZE, (0.20, 0.40, 0.80), (0.55, 0.72, 0.95))
    cloud = np.array([0.97, 0.97, 0.98]) * (0.75 + 0.25 * cover)[..., None]
    return _to_image(sky * (1 - cover[..., None]) + cloud * cover[..., None])


def wood(rng: np.random.Generator) -> Image.Image:
    """Wood grain: growth rings warped by noise, plus fine fibres."""
    s = SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    warp = _noise(rng, s, octaves=4, base=3)
    rings = np.sin(2 * np.pi * (np.hypot(xx - 0.3, (yy - 1.4) * 0.25) * 28 + 3 * warp)) * 0.5 + 0.5
    fibres = _noise(rng, s, octaves=3, base=64)
    t = 0.6 * rings + 0.4 * fibres
    light, dark = np.array((0.80, 0.60, 0.38)), np.array((0.50, 0.30, 0.15))
    return _to_image(dark + (light - dark) * t[..., None])


def city(rng: np.random.Generator) -> Image.Image:
    """Building silhouettes at dusk with lit windows: hard edges and a regular grid."""
    s = SIZE
    im = _to_image(_vertical(s, (0.10, 0.12, 0.30), (0.90, 0.50, 0.35)))
    draw = ImageDraw.Draw(im)
    x = -10
    while x < s:
        w = int(rng.integers(24, 56))
        top = int(rng.integers(int(0.25 * s), int(0.7 * s)))
        grey = int(rng.integers(20, 50))
        draw.rectangle([x, top, x + w, s], fill=(grey, grey, grey + 10))
        for wy in range(top + 6, s - 6, 12):
            for wx in range(x + 5, x + w - 6, 10):
                if rng.random() < 0.45:
                    draw.rectangle([wx, wy, wx + 4, wy + 6], fill=(250, 210, 120))
        x += w + int(rng.integers(0, 8))
    return im.filter(ImageFilter.SMOOTH)


def tiles(rng: np.random.Generator) -> Image.Image:
    """Flat-coloured floor tiles with grout: a lossless (PNG) sample."""
    s, n = SIZE, 8
    palette = [(200, 190, 170), (90, 110, 140), (170, 80, 60), (230, 225, 215)]
    im = Image.new("RGB", (s, s), (60, 60, 60))
    draw = ImageDraw.Draw(im)
    step = s // n
    for i in range(n):
        for j in range(n):
            colour = palette[int(rng.integers(len(palette)))] if (i + j) % 3 else palette[3]
            draw.rectangle([j * step + 2, i * step + 2, (j + 1) * step - 3, (i + 1) * step - 3], fill=colour)
    return im


SCENES = {
    "landscape.jpg": landscape,
    "bricks.jpg": bricks,
    "still_life.jpg": still_life,
    "clouds.jpg": clouds,
    "wood.jpg": wood,
    "city.jpg": city,
    "tiles.png": tiles,
}

# Masks written white = known, black = hole (train.images.save_mask's convention).
MASKS = {"mask_strokes_10.png": (0.10, 7), "mask_strokes_30.png": (0.30, 8)}


def main(out: Path = HERE) -> None:
    """Write every scene of :data:`SCENES` and mask of :data:`MASKS` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for seed, (name, scene) in enumerate(SCENES.items()):
        image = scene(np.random.default_rng(1000 + seed))
        if name.endswith(".jpg"):
            image.save(out / name, quality=90)
        else:
            image.save(out / name, optimize=True)

    # Imported here so that the images above need nothing but numpy and Pillow.
    sys.path.insert(0, str(HERE.parents[1]))
    from train.images import save_mask
    from train.masks import generate_mask

    for name, (ratio, seed) in MASKS.items():
        save_mask(generate_mask(SIZE, SIZE, ratio, 0.005, seed), out / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
