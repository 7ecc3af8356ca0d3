"""A toy world where RealCustom's claims can be trained and measured on a CPU.

An image shows ONE subject on a plain background. The subject is a shape (the class
word of the caption: "circle", "square", ...) with an *identity* the caption does not
name: a two-tone colouring, its `body` colour on the upper half and its `accent` colour
on the lower half. The adapter's training captions (the shards) name only the shape and
the context, the real word:

  "a circle on a blue background"

So the real word alone leaves the identity open, and only a subject image can tell the
model which identity to draw: the same split between the real word's general
connotation and the given subject that RealCustom narrows (Sec. 1). The base model
also sees captions that name the identity ("a red and white circle on a blue
background", `named_caption`), as a real base has seen "red toy" and "white toy": it
must be able to draw an identity through text before an adapter can be asked to carry
one in through attention (gate G0, toy/reproduction.py). Identities are ordered colour pairs; `HELD_OUT` of them never appear
in training and are the evaluation subjects.

Images are small (`image_size`, 16 px in configs/toy_world.py) and drawn without
antialiasing, so every pixel has one palette colour and the metrics
(`toy/metrics.py`) can read colours back exactly.
"""
from collections.abc import Iterator
import dataclasses
import io
import json
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw

from train import synthetic_data as toy_data

# The toy shapes' colours (train/synthetic_data.py), so both worlds speak the same palette.
PALETTE = dict(toy_data.COLORS)
COLORS = tuple(PALETTE)
SHAPES = ('circle', 'square', 'triangle', 'diamond')
# Whole-word tokens of the world's tokenizer: every caption word is ONE token, so the
# target word's cross-attention map (Eq. 11) comes from a single token.
# 'sks' is the pseudo-word of the Textual Inversion / DreamBooth baselines (toy/baselines.py):
# a token no caption uses.
WORDS = ('a', 'an', 'and', 'on', 'background', 'sks') + COLORS + SHAPES
# Identities are ordered (body, accent) pairs of different colours: 8 * 7 = 56.
IDENTITIES = tuple((b, a) for b in COLORS for a in COLORS if a != b)
NUM_HELD_OUT = 8
_SPLIT_SEED = 1234  # fixes which identities are held out, independently of data seeds
_rng = np.random.default_rng(_SPLIT_SEED)
HELD_OUT = tuple(IDENTITIES[i] for i in sorted(
    _rng.choice(len(IDENTITIES), NUM_HELD_OUT, replace=False)))
TRAIN_IDENTITIES = tuple(i for i in IDENTITIES if i not in HELD_OUT)
del _rng


@dataclasses.dataclass(frozen=True)
class Scene:
  """Everything that decides one image.

  Attributes:
    shape: one of SHAPES (the class word).
    body: colour of the subject's upper half.
    accent: colour of the subject's lower half.
    background: background colour (never body or accent).
    center: (x, y) of the shape's centre, pixels.
    size: side of the shape's bounding square, pixels.
  """
  shape: str
  body: str
  accent: str
  background: str
  center: tuple[float, float]
  size: float

  @property
  def caption(self) -> str:
    return caption(self.shape, self.background)

  @property
  def named_caption(self) -> str:
    return named_caption(self.shape, self.body, self.accent, self.background)

  @property
  def identity(self) -> tuple[str, str]:
    return (self.body, self.accent)


def article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def caption(shape: str, background: str) -> str:
  """The caption of a scene: shape and background only, never the identity."""
  return f'{article(shape)} {shape} on {article(background)} {background} background'


def named_caption(shape: str, body: str, accent: str, background: str) -> str:
  """The caption that names the identity too: "a red and white circle on a ..."."""
  return (f'{article(body)} {body} and {accent} {shape} on {article(background)} '
          f'{background} background')


def caption_roles(text: str) -> tuple[list[int], list[int]]:
  """Word positions of a caption by role: (object words, background words).

  The object words are the shape and the identity's colours (every word before "on"
  but the article and "and"); the background words are the colour after "on" and
  "background". Positions count words from 0 (token i + 1 after BOS, as every world word
  is one token).
  """
  words = text.split()
  if 'on' not in words:
    return [], []
  on = words.index('on')
  obj = [i for i in range(on) if words[i] not in ('a', 'an', 'and')]
  bg = [i for i in range(on + 1, len(words)) if words[i] not in ('a', 'an')]
  return obj, bg


def shape_mask(shape: str, center: tuple[float, float], size: float,
               image_size: int) -> np.ndarray:
  """(S, S) bool mask of a shape, drawn without antialiasing."""
  if shape not in SHAPES:
    raise ValueError(f'unknown shape {shape!r}; one of {SHAPES}')
  canvas = Image.new('L', (image_size, image_size), 0)
  draw = ImageDraw.Draw(canvas)
  cx, cy = center
  r = size / 2
  if shape == 'circle':
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
  elif shape == 'square':
    # A square of the same area as the other shapes' fill would look small; 0.8 keeps
    # the four shapes' areas comparable.
    s = 0.8 * r
    draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
  elif shape == 'triangle':
    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
  else:
    draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
  return np.asarray(canvas) > 127


def render(scene: Scene, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws a scene.

  Args:
    scene: what to draw.
    image_size: side of the square image, pixels.

  Returns:
    (image (S, S, 3) uint8, object mask (S, S) bool).
  """
  mask = shape_mask(scene.shape, scene.center, scene.size, image_size)
  image = np.empty((image_size, image_size, 3), np.uint8)
  image[:] = PALETTE[scene.background]
  rows = np.arange(image_size)[:, None] + 0.5
  upper = np.broadcast_to(rows < scene.center[1], mask.shape)
  image[mask & upper] = PALETTE[scene.body]
  image[mask & ~upper] = PALETTE[scene.accent]
  return image, mask


def random_scene(rng: np.random.Generator, image_size: int,
                 identities=TRAIN_IDENTITIES, shape: str | None = None,
                 background: str | None = None,
                 excluded_backgrounds: tuple[str, ...] = ()) -> Scene:
  """Draws a random scene: shape, identity, a background unlike it, place and size.

  Args:
    rng: the numpy generator.
    image_size: image side, pixels.
    identities: (body, accent) pairs to draw from.
    shape: fixed shape, or None for a random one.
    background: fixed background, or None for a random colour other than the identity's.
    excluded_backgrounds: colours the random background must also avoid.

  Returns:
    The Scene.
  """
  body, accent = identities[rng.integers(len(identities))]
  shape = shape or SHAPES[rng.integers(len(SHAPES))]
  if background is None:
    choices = [c for c in COLORS if c not in (body, accent) + tuple(excluded_backgrounds)]
    background = choices[rng.integers(len(choices))]
  elif background in (body, accent):
    raise ValueError(f'background {background!r} equals a colour of the identity '
                     f'{(body, accent)}')
  # Large, so the identity is a real share of the base's loss (at 0.5-0.75 naming it
  # lowered the noise error by 0.2-2%: too little for the base to learn to draw it), and
  # small enough that the background stays the most frequent single colour.
  size = rng.uniform(0.65, 0.9) * image_size
  cx, cy = rng.uniform(size / 2, image_size - size / 2, size=2)
  return Scene(shape, body, accent, background, (float(cx), float(cy)), float(size))


def iter_scenes(num_images: int, image_size: int, seed: int,
                identities=TRAIN_IDENTITIES) -> Iterator[Scene]:
  rng = np.random.default_rng(seed)
  for _ in range(num_images):
    yield random_scene(rng, image_size, identities)


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  # PNG, not JPEG: chroma subsampling would smear the colours of a 16 px image, and the
  # metrics read colours back exactly.
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


def rerendered(scene: Scene, rng: np.random.Generator, image_size: int) -> Scene:
  """The same subject (shape and identity) in another scene: a new background colour
  (neither the identity's nor `scene`'s own), place and size."""
  return random_scene(rng, image_size, (scene.identity,), shape=scene.shape,
                      excluded_backgrounds=(scene.background,))


def write_world_shards(out_dir: str | os.PathLike[str], num_images: int, image_size: int,
                       seed: int, images_per_shard: int = 512,
                       with_reference: bool = False) -> list[str]:
  """Writes training images of the TRAIN identities as img2dataset webdataset shards.

  Each sample is `KEY.png`, `KEY.txt` (the caption) and `KEY.json` (metadata with the
  scene and an aesthetic score of 6.0, so an aesthetic filter keeps everything).
  Deterministic for a seed. Written under a temporary name and renamed, so an
  interrupted run never leaves a partial set behind.

  Args:
    out_dir: directory to create (must not exist yet).
    num_images: number of samples.
    image_size: image side, pixels.
    seed: numpy seed of the scenes.
    images_per_shard: samples per `.tar`.
    with_reference: also write `KEY.ref.png`, the sample's subject re-rendered in
      another scene (`rerendered`), read by `config.data.subject_reference='stored'`.
      The training scenes are the same as without it (the references draw from a
      generator of their own).

  Returns:
    The shard paths.
  """
  if num_images <= 0 or images_per_shard <= 0:
    raise ValueError(f'num_images ({num_images}) and images_per_shard '
                     f'({images_per_shard}) must be positive')
  out_dir = os.fspath(out_dir)
  tmp = f'{out_dir}.tmp{os.getpid()}'
  os.makedirs(tmp, exist_ok=True)
  scenes = list(iter_scenes(num_images, image_size, seed))
  reference_rng = np.random.default_rng([seed, 1])
  names = []
  for shard, start in enumerate(range(0, num_images, images_per_shard)):
    samples = []
    for i, scene in enumerate(scenes[start:start + images_per_shard]):
      image, _ = render(scene, image_size)
      key = f'{shard:05d}{i:04d}'
      meta = dict(dataclasses.asdict(scene), key=key, caption=scene.caption,
                  width=image_size, height=image_size, aesthetic=6.0)
      members = {'png': _png(image), 'txt': scene.caption.encode()}
      if with_reference:
        reference = rerendered(scene, reference_rng, image_size)
        members['ref.png'] = _png(render(reference, image_size)[0])
        meta['reference'] = dataclasses.asdict(reference)
      members['json'] = json.dumps(meta).encode()
      samples.append((key, members))
    name = f'{shard:05d}.tar'
    toy_data.write_webdataset_shard(os.path.join(tmp, name), samples)
    names.append(name)
  os.replace(tmp, out_dir)
  return [os.path.join(out_dir, n) for n in names]


def render_arrays(num_images: int, image_size: int, seed: int,
                  identities=TRAIN_IDENTITIES) -> tuple[np.ndarray, list[str]]:
  """The same scenes as `write_world_shards` (same seed) as arrays: (N, S, S, 3), captions."""
  scenes = list(iter_scenes(num_images, image_size, seed, identities))
  images = np.stack([render(s, image_size)[0] for s in scenes])
  return images, [s.caption for s in scenes]


@dataclasses.dataclass(frozen=True)
class EvalCase:
  """One evaluation prompt for a held-out subject.

  Attributes:
    subject: the subject's reference scene (a held-out identity).
    background: the background the prompt asks for (not a colour of the subject, nor
      the reference's own background, so following the text is visible).
    prompt: the prompt; its real word is the subject's shape.
  """
  subject: Scene
  background: str

  @property
  def prompt(self) -> str:
    return caption(self.subject.shape, self.background)

  @property
  def named_prompt(self) -> str:
    """The prompt naming the subject's identity (G0's oracle)."""
    return named_caption(self.subject.shape, *self.subject.identity, self.background)

  @property
  def word(self) -> str:
    return self.subject.shape


def eval_cases(image_size: int, prompts_per_subject: int, seed: int = 99) -> list[EvalCase]:
  """One reference scene per held-out identity and `prompts_per_subject` prompts each.

  Shapes cycle over the subjects, so every class word is tested.

  Args:
    image_size: image side, pixels.
    prompts_per_subject: backgrounds per subject (at most 5: 8 colours minus the two
      identity colours and the reference background).
    seed: numpy seed of the reference scenes and the prompts' backgrounds.

  Returns:
    len(HELD_OUT) * prompts_per_subject cases, grouped by subject.
  """
  if not 1 <= prompts_per_subject <= len(COLORS) - 3:
    raise ValueError(f'prompts_per_subject must be in [1, {len(COLORS) - 3}], got '
                     f'{prompts_per_subject}')
  rng = np.random.default_rng(seed)
  cases = []
  for i, identity in enumerate(HELD_OUT):
    subject = random_scene(rng, image_size, (identity,), shape=SHAPES[i % len(SHAPES)])
    others = [c for c in COLORS if c not in identity + (subject.background,)]
    for bg in rng.choice(others, prompts_per_subject, replace=False):
      cases.append(EvalCase(subject, str(bg)))
  return cases
