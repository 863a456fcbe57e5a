"""The built-in synthetic candidate pool: the embedded default that makes the whole pipeline run offline.

Each sample is a small scene (coloured shapes of a size, count and position, sometimes a second object, sometimes
a rendered word, on a softly shaded grey background) with a natural-language caption drawn from several templates
and synonyms. Everything is a pure function of (seed, stream, index), so the same seed gives byte-identical images
and captions, and a tiny CLIP at 64 px learns it in minutes on a CPU.

Diversity (issue 16.6). Dedup calls two images near duplicates when their 64-bit pHashes (the signs of the 8 x 8
lowest DCT frequencies of a 32 x 32 grey thumbnail, against their median) are within 4 bits and their 8 x 8 RGB
thumbnails within 40 (clip.dedup). On flat backgrounds a small object barely moves those frequencies, so scenes
with a small object in about the same place collided whatever its shape: 1.1% of a 4,096-scene pool, 6.4% of
20,000 and 20% of 122,880 were removed. Now each scene also draws, from its own seed sub-stream (so layout and
caption are unchanged), a continuous appearance: a background level within +-12 of its named grey, a grey shading
made of random amplitudes on every one of the 8 x 8 cosine frequencies pHash keeps (12 grey levels standard
deviation: clouds, not clutter), and a per-object colour jitter of +-12 per channel (always nearest its own
palette colour, so captions and the colour / shape classes of the evaluation sets mean what they did). The
shading sets most pHash bits independently of the objects. Measured with collect's hashing and dedup's criteria:
0 of 4,096 removed (the dedup stage: 0 of 40,960, was 12%), 9 pairs among 100,000 scenes and 29 among 200,000,
a pair rate of ~1.5e-9 that stays flat with the pool size. At a constant pair rate p a pool of n loses at most
p * n**2 / 2 samples, a fraction p * n / 2: 0.07% of 1M, 0.7% of 10M; it would pass 2% near 25M scenes. The
remaining collisions are large black, white or yellow objects in about the same place, whose contrast outweighs
the shading; more shading would remove them too, at the cost of busier images.

Compositional hold-out: a fixed share (`heldout_fraction`) of the colour x shape combinations never appears in
training (neither as the main nor as the second object); every colour and every shape still appears with other
partners. The evaluation stage asks for those combinations zero-shot ("synthetic-heldout").

Evaluation sets come from a different seed stream than training, so their images are not literally in the pool
(decontamination hashes them anyway):

    for image, label in generate_eval_set("synthetic-shapes", seed=0, n=500, image_size=64): ...
    eval_classnames("synthetic-heldout")   # e.g. ["blue star", "green cross", ...] -> "a photo of a {label}."
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 210, 30),
    "purple": (148, 60, 190),
    "orange": (255, 127, 14),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
SHAPE_SYNONYMS = {"circle": ["disc", "dot"], "square": ["box"], "cross": ["plus sign"], "diamond": ["rhombus"]}
SIZES = {"small": ["small", "tiny", "little"], "large": ["large", "big"]}
COUNT_WORDS = {2: ["two", "a pair of"], 3: ["three"]}
POSITIONS: dict[str, tuple[float, float]] = {  # centre of the region, in image fractions
    "center": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
    "top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73),
}
WORDS = ["cat", "dog", "sun", "car", "tree", "fish", "bird", "home"]
BACKGROUNDS = {"gray": 128, "light gray": 175, "dark gray": 80}  # mean grey level of each named background
TEMPLATES = [
    "{obj}", "a photo of {obj}", "a picture of {obj}", "an image of {obj}", "a drawing of {obj}",
    "{obj} on a {bg} background", "a simple illustration of {obj}", "there is {obj} here", "clip art of {obj}",
    "a rendering of {obj} against a {bg} background", "{obj}, digital art", "close-up of {obj}",
]

EVAL_SET_NAMES = ["synthetic-shapes", "synthetic-colors", "synthetic-heldout"]
# Zero-shot prompts of the evaluation sets, in the pool's own caption styles (the evaluation stage and the training
# curve, clip.train.monitor, use the same ensemble).
EVAL_TEMPLATES = ("a photo of a {}.", "a {}", "a picture of a {}", "a drawing of a {}", "a simple illustration of a {}",
                  "clip art of a {}")
DEFAULT_HELDOUT_FRACTION = 0.2
_TRAIN_STREAM = 0
_EVAL_STREAMS = {name: 1000 + i for i, name in enumerate(EVAL_SET_NAMES)}  # disjoint from the training stream
_HOLDOUT_SEED = 20240611  # the held-out split is a property of the task, not of a run's seed
_SUPERSAMPLE = 2  # draw at 2x and shrink: anti-aliased edges
_LOOKS_SUBSTREAM = 1  # seed sub-stream of the appearance draws (colour jitter, background level and shading)

# Appearance, drawn continuously so that no two scenes look alike (see "Diversity" above). The shading is grey, so
# it never reads as one of the COLORS; the jitter moves a colour by at most 36 (summed over channels), and the
# closest pair of palette colours (orange, yellow) is 114 apart, so every object stays nearest its own colour.
COLOR_JITTER = 12  # each RGB channel of an object moves uniformly within +-this
BACKGROUND_LEVEL_JITTER = 12.0  # the background's mean grey moves within +-this of its name's level
SHADING_SIDE = 8  # cosine frequencies 0..7 in each direction: the 8 x 8 that pHash keeps
SHADING_STD = 12.0  # pixel standard deviation of the shading, grey levels
SHADING_FALLOFF = 4.0  # coefficient scale 1 / (1 + (u + v) / falloff): gentle, so every pHash bit varies


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    cx: float  # centre, image fractions
    cy: float
    radius: float  # image fraction
    rotation: float  # degrees
    rgb: tuple[int, int, int]  # the colour's palette value, jittered per object (within COLOR_JITTER)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    word: str | None
    caption: str
    background_level: float  # mean grey level of the background, within BACKGROUND_LEVEL_JITTER of its name's
    shading: tuple[float, ...]  # [SHADING_SIDE**2] cosine coefficients (row v, column u) of the background's grey


@functools.cache
def heldout_combinations(fraction: float = DEFAULT_HELDOUT_FRACTION) -> frozenset[tuple[str, str]]:
    """(colour, shape) pairs never shown in training; every colour and shape keeps >= 2 training partners."""
    combos = [(c, s) for c in COLORS for s in SHAPES]
    target = round(fraction * len(combos))
    rng = np.random.default_rng(_HOLDOUT_SEED)
    left_per_color = {c: len(SHAPES) for c in COLORS}
    left_per_shape = {s: len(COLORS) for s in SHAPES}
    chosen: set[tuple[str, str]] = set()
    for index in rng.permutation(len(combos)):
        if len(chosen) >= target:
            break
        color, shape = combos[index]
        if left_per_color[color] > 2 and left_per_shape[shape] > 2:
            chosen.add((color, shape))
            left_per_color[color] -= 1
            left_per_shape[shape] -= 1
    return frozenset(chosen)


@functools.cache
def training_combinations(fraction: float = DEFAULT_HELDOUT_FRACTION) -> tuple[tuple[str, str], ...]:
    held = heldout_combinations(fraction)
    return tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in held)


def vocabulary(heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[str]:
    """Words and phrases of the synthetic world: the embedded default's query list.

    Colours, shapes (singular, plural, synonyms), sizes, rendered words, and the colour + shape phrases of
    the training combinations (held-out ones would match nothing).
    """
    words = set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(WORDS)
    words |= {w for syns in SHAPE_SYNONYMS.values() for w in syns}
    words |= {w for syns in SIZES.values() for w in syns}
    for color, shape in training_combinations(heldout_fraction):
        words |= {f"{color} {shape}", f"{color} {PLURALS[shape]}"}
    return sorted(words)


def _rng(seed: int, stream: int, index: int, *substream: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, stream, index, *substream])


@functools.cache
def _shading_scale() -> np.ndarray:
    """[SHADING_SIDE, SHADING_SIDE] standard deviation of each cosine coefficient of the background shading.

    Every one of the 8 x 8 lowest frequencies (those pHash keeps) gets energy, falling off gently with frequency,
    scaled so that the shading's pixel standard deviation is SHADING_STD grey levels on average. The constant term
    is 0: the mean level is `background_level`.
    """
    v, u = np.meshgrid(np.arange(SHADING_SIDE), np.arange(SHADING_SIDE), indexing="ij")
    scale = 1.0 / (1.0 + (u + v) / SHADING_FALLOFF)
    scale[0, 0] = 0.0
    # A product of cosines cos(pi u x) cos(pi v y) has mean square 1/4 over the image (1/2 when u or v is 0).
    mean_square = np.where((u == 0) | (v == 0), 0.5, 0.25)
    return scale * (SHADING_STD / np.sqrt(np.sum(scale**2 * mean_square)))


def _jittered_rgb(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    red, green, blue = np.clip(np.asarray(COLORS[color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
    return int(red), int(green), int(blue)


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def _place(rng: np.random.Generator, radius: float, taken: list[tuple[float, float, float]]) -> tuple[float, float]:
    """A centre inside the image, away from already placed objects when possible (rejection sampling)."""
    lo, hi = radius + 0.02, 1.0 - radius - 0.02
    best = (0.5, 0.5)
    for _ in range(30):
        x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        best = (x, y)
        if all(math.hypot(x - ox, y - oy) > radius + orad + 0.02 for ox, oy, orad in taken):
            break
    return best


def _object_phrase(rng: np.random.Generator, color: str, shape: str, count: int, size: str | None) -> str:
    noun = shape
    if count == 1 and shape in SHAPE_SYNONYMS and rng.random() < 0.15:
        noun = _pick(rng, SHAPE_SYNONYMS[shape])
    size_word = _pick(rng, SIZES[size]) + " " if size and rng.random() < 0.7 else ""
    if count == 1:
        head = f"{size_word}{color} {noun}"
        return ("an " if head[0] in "aeiou" else "a ") + head
    return f"{_pick(rng, COUNT_WORDS[count])} {size_word}{color} {PLURALS[shape]}"


def make_scene(seed: int, index: int, stream: int = _TRAIN_STREAM,
               heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
               combos: tuple[tuple[str, str], ...] | None = None, single: bool = False) -> Scene:
    """The scene and caption of one sample: a pure function of the arguments (no pixels are drawn here)."""
    rng = _rng(seed, stream, index)
    looks = _rng(seed, stream, index, _LOOKS_SUBSTREAM)  # appearance only: the layout and caption draws stay as they were
    combos = combos or training_combinations(heldout_fraction)
    color, shape = combos[int(rng.integers(len(combos)))]
    count = 1 if single else int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    size = "small" if (count > 1 or rng.random() < 0.5) else "large"
    radius = float(rng.uniform(0.09, 0.14)) if size == "small" else float(rng.uniform(0.2, 0.28))
    objects: list[SceneObject] = []
    taken: list[tuple[float, float, float]] = []
    position = None
    if count == 1 and not single and rng.random() < 0.5:
        position = _pick(rng, list(POSITIONS))
        px, py = POSITIONS[position]
        jitter = 0.04
        cx = min(max(px + float(rng.uniform(-jitter, jitter)), radius), 1 - radius)
        cy = min(max(py + float(rng.uniform(-jitter, jitter)), radius), 1 - radius)
    else:
        cx, cy = _place(rng, radius, taken)
    for i in range(count):
        if i > 0:
            cx, cy = _place(rng, radius, taken)
        objects.append(SceneObject(color, shape, cx, cy, radius, float(rng.uniform(0, 360)),
                                   _jittered_rgb(looks, color)))
        taken.append((cx, cy, radius))
    phrase = _object_phrase(rng, color, shape, count, size)
    if position:
        if position == "center":
            phrase += " " + _pick(rng, ["in the center", "in the middle"])
        else:
            phrase += f" {_pick(rng, ['on the', 'at the'] if position in ('left', 'right') else ['in the', 'at the'])} {position}"
    second = None
    if not single and count == 1 and size == "small" and rng.random() < 0.35:
        other = [c for c in combos if c != (color, shape)]
        second_color, second_shape = other[int(rng.integers(len(other)))]
        second_radius = float(rng.uniform(0.09, 0.14))
        sx, sy = _place(rng, second_radius, taken)
        objects.append(SceneObject(second_color, second_shape, sx, sy, second_radius, float(rng.uniform(0, 360)),
                                   _jittered_rgb(looks, second_color)))
        second = _object_phrase(rng, second_color, second_shape, 1, None)
    word = _pick(rng, WORDS) if not single and rng.random() < 0.15 else None
    background = _pick(rng, list(BACKGROUNDS))
    if single:
        caption = f"a photo of a {color} {shape}"
    else:
        obj = phrase + (f" and {second}" if second else "")
        caption = _pick(rng, TEMPLATES).format(obj=obj, bg=background)
        if word:
            caption += _pick(rng, [f' with the word "{word}"', f", and the text {word}", f' labelled "{word}"'])
        if rng.random() < 0.3:
            caption = caption[0].upper() + caption[1:] + "."
    level = BACKGROUNDS[background] + float(looks.uniform(-BACKGROUND_LEVEL_JITTER, BACKGROUND_LEVEL_JITTER))
    scale = _shading_scale()
    shading = looks.normal(0.0, 1.0, scale.shape) * scale  # [SHADING_SIDE, SHADING_SIDE]
    return Scene(tuple(objects), background, word, caption, level, tuple(shading.reshape(-1).tolist()))


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    def ring(points: int, radii: list[float], offset: float) -> list[tuple[float, float]]:
        out = []
        for k in range(points * len(radii)):
            angle = math.radians(offset + 360.0 * k / (points * len(radii)))
            rad = radii[k % len(radii)]
            out.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
        return out

    if shape == "triangle":
        return ring(3, [r], rotation)
    if shape == "star":
        return ring(5, [r, r * 0.45], rotation)
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "square":
        return ring(4, [r * 1.25], 45 + (rotation % 30) - 15)
    if shape == "cross":
        a, b = r, r * 0.35
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(f"unknown shape {shape!r}")


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # noqa: BLE001 - FreeType missing: the small bitmap font still renders words
        return ImageFont.load_default()


@functools.cache
def _cosine_basis(side: int) -> np.ndarray:
    """[SHADING_SIDE, side]: row k is cos(pi k x) sampled at the pixel centres x = (i + 0.5) / side."""
    position = (np.arange(side) + 0.5) / side
    return np.cos(np.pi * np.arange(SHADING_SIDE)[:, None] * position[None, :])


def _background(scene: Scene, side: int) -> np.ndarray:
    """[side, side] uint8 grey background: the mean level plus the smooth shading (sum of cosines)."""
    basis = _cosine_basis(side)
    coefficients = np.asarray(scene.shading).reshape(SHADING_SIDE, SHADING_SIDE)  # [v, u]
    field = basis.T @ coefficients @ basis  # [side (y), side (x)]
    return np.clip(np.rint(scene.background_level + field), 0, 255).astype(np.uint8)


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """The scene's pixels: an RGB image of image_size x image_size."""
    side = image_size * _SUPERSAMPLE
    grey = Image.fromarray(_background(scene, side))
    image = Image.merge("RGB", (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.cx * side, obj.cy * side, obj.radius * side
        fill = obj.rgb
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r, obj.rotation), fill=fill)
    if scene.word:
        font = _font(max(8, side // 6))
        left, top, right, bottom = draw.textbbox((0, 0), scene.word, font=font)
        x = (side - (right - left)) / 2 - left
        y = side - (bottom - top) - side * 0.04 - top
        text_color = (0, 0, 0) if scene.background == "light gray" else (255, 255, 255)
        draw.text((x, y), scene.word, fill=text_color, font=font)
    return image.reduce(_SUPERSAMPLE)  # box-filter 2x2 average: anti-aliased edges, cheaply


def training_caption(seed: int, index: int, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    return make_scene(seed, index, heldout_fraction=heldout_fraction).caption


def training_image(seed: int, index: int, image_size: int,
                   heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> Image.Image:
    return render_scene(make_scene(seed, index, heldout_fraction=heldout_fraction), image_size)


def eval_classnames(name: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[str]:
    """Class labels of an evaluation set, in class-index order; prompts read "a photo of a {label}."."""
    if name == "synthetic-shapes":
        return list(SHAPES)
    if name == "synthetic-colors":
        return list(COLORS)
    if name == "synthetic-heldout":
        return [f"{c} {s}" for c, s in sorted(heldout_combinations(heldout_fraction))]
    raise ValueError(f"unknown synthetic evaluation set {name!r}; choose from {EVAL_SET_NAMES}")


def generate_eval_set(name: str, seed: int, n: int, image_size: int,
                      heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[tuple[Image.Image, str]]:
    """`n` (image, class label) pairs, classes in turn; one object per image, from a seed stream training never uses.

    synthetic-shapes / synthetic-colors draw objects from training combinations (the label is the shape or the
    colour); synthetic-heldout draws only held-out combinations (the label is "colour shape"). Pass the
    `heldout_fraction` the pool was collected with (collect.synthetic.heldout_fraction) when it is not the default.
    """
    classes = eval_classnames(name, heldout_fraction)
    if not classes:  # heldout_fraction 0: there is nothing held out to evaluate
        return []
    train_combos = training_combinations(heldout_fraction)
    out: list[tuple[Image.Image, str]] = []
    for i in range(n):
        label = classes[i % len(classes)]
        if name == "synthetic-shapes":
            combos = tuple(c for c in train_combos if c[1] == label)
        elif name == "synthetic-colors":
            combos = tuple(c for c in train_combos if c[0] == label)
        else:
            combos = (tuple(label.split(" ", 1)),)
        scene = make_scene(seed, i, stream=_EVAL_STREAMS[name], heldout_fraction=heldout_fraction,
                           combos=combos, single=True)
        out.append((render_scene(scene, image_size), label))
    return out
