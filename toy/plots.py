"""The reproduction's pictures, drawn with PIL (no plotting library is a dependency).

- `tradeoff_plot`: text control against identity accuracy (or subject similarity), one
  point per variant and the pseudo-word baselines as curves over their training steps:
  Fig. 1c / Table 1's "similarity versus controllability" in the toy world's metrics.
- `sample_grid`: per case the subject, the prompt, then one column per variant (plain
  T2I, the naming prompt, no mask, RealCustom, the baselines) and the influence scope
  (Fig. 6 / Fig. 7 in miniature).
"""
import numpy as np
from PIL import Image
from PIL import ImageDraw

_COLORS = {'-': (90, 90, 90), 'soft': (30, 90, 200), 'binary': (200, 120, 20),
           'all ones': (200, 30, 30)}
_CURVE_COLORS = {'textual_inversion': (140, 40, 160), 'dreambooth': (0, 140, 140)}
_AXES = {'id': 'identity accuracy (body and accent colours)',
         'sim': 'subject similarity (palette histogram intersection)'}


def tradeoff_plot(summary: dict, path: str, curves: dict | None = None, x_key: str = 'id',
                  size: int = 560) -> None:
  """Scatter of (identity or similarity, text control) per variant, with standard-error
  bars; each baseline's points joined in training-step order.

  Args:
    summary: variant name -> {'text', 'text_se', x_key, x_key + '_se', 'scope', 'scoring'}.
    path: the PNG to write.
    curves: {method: [variant names in step order]} (the pseudo-word baselines).
    x_key: 'id' or 'sim'.
    size: side of the plot area, pixels.
  """
  curves = curves or {}
  pad_l, pad_b, pad_t, pad_r = 60, 50, 30, 170
  img = Image.new('RGB', (size + pad_l + pad_r, size + pad_t + pad_b), 'white')
  d = ImageDraw.Draw(img)
  px = lambda x: pad_l + x * size
  py = lambda y: pad_t + (1 - y) * size
  d.rectangle((px(0), py(1), px(1), py(0)), outline='black')
  for tick in np.linspace(0, 1, 6):
    d.line((px(tick), py(0), px(tick), py(0) + 5), fill='black')
    d.text((px(tick) - 10, py(0) + 8), f'{tick:.1f}', fill='black')
    d.line((px(0) - 5, py(tick), px(0), py(tick)), fill='black')
    d.text((px(0) - 35, py(tick) - 6), f'{tick:.1f}', fill='black')
  d.text((px(0.25), py(0) + 28), _AXES[x_key], fill='black')
  d.text((5, 5), 'text control (background accuracy)', fill='black')
  for method, names in curves.items():
    points = [(px(summary[n][x_key]), py(summary[n]['text'])) for n in names if n in summary]
    if len(points) > 1:
      d.line(points, fill=_CURVE_COLORS.get(method, (0, 0, 0)), width=2)
  member = {n: m for m, names in curves.items() for n in names}
  for name, r in summary.items():
    x, y = r[x_key], r['text']
    color = _COLORS.get(r['scope'], (0, 0, 0))
    if r['scoring'] == 'none':
      color = (20, 150, 60)
    if name in member:
      color = _CURVE_COLORS.get(member[name], (0, 0, 0))
    se = r[x_key + '_se']
    d.line((px(x - se), py(y), px(x + se), py(y)), fill=color)
    d.line((px(x), py(y - r['text_se']), px(x), py(y + r['text_se'])), fill=color)
    d.ellipse((px(x) - 4, py(y) - 4, px(x) + 4, py(y) + 4), fill=color)
    d.text((px(x) + 6, py(y) - 12), name, fill=color)
  legend = [('plain T2I', _COLORS['-']), ('soft scope', _COLORS['soft']),
            ('binary scope', _COLORS['binary']), ('no mask (all ones)', _COLORS['all ones']),
            ("scoring 'none'", (20, 150, 60)),
            ('Textual Inversion', _CURVE_COLORS['textual_inversion']),
            ('DreamBooth', _CURVE_COLORS['dreambooth'])]
  for i, (label, color) in enumerate(legend):
    y = pad_t + 10 + 18 * i
    d.ellipse((px(1) + 15, y, px(1) + 23, y + 8), fill=color)
    d.text((px(1) + 30, y - 2), label, fill='black')
  img.save(path)


def _tile(image: np.ndarray, cell: int) -> Image.Image:
  return Image.fromarray(np.asarray(image, np.uint8)).resize((cell, cell), Image.NEAREST)


def sample_grid(cases, refs, images: dict[str, np.ndarray], scopes: np.ndarray, path: str,
                cell: int = 64, max_rows: int = 16) -> None:
  """Rows of [subject, prompt, one column per variant..., scope] for each case.

  Args:
    cases: the evaluation cases (`toy_world.EvalCase`).
    refs: (H, W, 3) reference images, one per case.
    images: variant name -> (N, H, W, 3) uint8, in column order.
    scopes: (N, h, w) final influence scope of the 'realcustom' samples.
    path: the PNG to write.
    cell: side of one picture, pixels.
    max_rows: at most this many cases.
  """
  rows = min(len(cases), max_rows)
  text_w = 230
  headers = ['subject', 'prompt'] + [k.replace('_', ' ') for k in images] + ['scope']
  widths = [cell, text_w] + [cell] * len(images) + [cell]
  img = Image.new('RGB', (sum(widths) + 5 * len(widths), 32 + rows * (cell + 4)), 'white')
  d = ImageDraw.Draw(img)
  xs = np.cumsum([0] + [w + 5 for w in widths])[:-1]
  for i, (x, h) in enumerate(zip(xs, headers)):
    d.text((x + 2, 4 + 12 * (i % 2 if i >= 2 else 0)), h, fill='black')
  for r in range(rows):
    y = 32 + r * (cell + 4)
    img.paste(_tile(refs[r], cell), (int(xs[0]), y))
    d.text((int(xs[1]) + 2, y + cell // 2 - 6), f'{cases[r].prompt}\nword: {cases[r].word}',
           fill='black')
    for col, key in zip(xs[2:-1], images):
      img.paste(_tile(images[key][r], cell), (int(col), y))
    scope = np.clip(np.asarray(scopes[r]) * 255, 0, 255).astype(np.uint8)
    img.paste(_tile(np.repeat(scope[..., None], 3, -1), cell), (int(xs[-1]), y))
  img.save(path)
