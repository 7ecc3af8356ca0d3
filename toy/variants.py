"""What the toy reproduction trains (adapter recipes x training seeds) and samples
(inference settings), as data: toy/reproduction.py trains, toy/evaluation.py samples.
"""
import dataclasses

from toy import selection_gate
from toy import world

# config.toy.subject_encoder: the frozen random tower written with the base, or the
# CLIP-like tower trained by toy/encoder.py.
SUBJECT_ENCODERS = ('random', 'contrastive')

# The adapters the reproduction can train: name -> config overrides (config.toy.adapters
# picks which, config.toy.adapter_seeds with how many training seeds each).
ADAPTER_RUNS = {
    # The paper's recipe: Eqs. 5-10 (softmax scores), the training image as its own
    # subject. Every run states the settings it is about, so that a recipe stays the
    # same recipe (and keeps its trained adapters) whatever the config's defaults are.
    'adaptive': {'model.score_normalization': 'softmax', 'data.subject_reference': 'self'},
    'none': {'model.scoring': 'none', 'data.subject_reference': 'self'},  # Table 3 ID-2
    # G2: visual K/V started as copies of the text K/V.
    'copy_text': {'train.visual_kv_init': 'copy_text', 'model.score_normalization': 'softmax',
                  'data.subject_reference': 'self'},
    # Table 3 IDs 3-5 trained with their own fusion (not swapped in at inference).
    **{f'{f}_fusion': {'model.fusion': f, 'model.score_normalization': 'softmax',
                       'data.subject_reference': 'self'} for f in ('text', 'visual', 'mean')},
    # The subject re-rendered in another scene as the training reference
    # (config.data.subject_reference='stored'): with and without scoring.
    'adaptive_ref': {'model.score_normalization': 'softmax',
                     'data.subject_reference': 'stored'},
    'none_ref': {'model.scoring': 'none', 'data.subject_reference': 'stored'},
    # S per token (sigmoid) instead of Eq. 8's softmax over the tokens: every token's
    # Eq. 9 gain keeps a gradient. With the paper's and with the re-rendered reference.
    'adaptive_sigmoid': {'model.score_normalization': 'sigmoid',
                         'data.subject_reference': 'self'},
    'adaptive_sigmoid_ref': {'model.score_normalization': 'sigmoid',
                             'data.subject_reference': 'stored'},
    # Eq. 10's selection with a straight-through gradient (config.train.
    # selection_gradient): the score nets learn what keeping each token changes.
    'adaptive_st': {'train.selection_gradient': 'straight_through',
                    'model.score_normalization': 'softmax', 'data.subject_reference': 'self'},
    'adaptive_st_ref': {'train.selection_gradient': 'straight_through',
                        'model.score_normalization': 'softmax',
                        'data.subject_reference': 'stored'},
    # The paper's recipe plus a loss pulling the fused scores towards the frozen base's
    # cross-attention map of the caption's shape word (config.train.score_supervision).
    'adaptive_wordmap': {'train.score_supervision': 'word_map',
                         'train.subject_words': world.SHAPES,
                         'model.score_normalization': 'softmax',
                         'data.subject_reference': 'self'},
    # The same with Eq. 10's training range narrowed to [0.6, 1.0] (mean 0.8, the
    # inference ratio): the paper's [0.3, 1.0] drops 35% of the tokens on average, and
    # these adapters transfer less than ID-2's even with every token kept.
    'adaptive_wordmap_narrow': {'train.score_supervision': 'word_map',
                                'train.subject_words': world.SHAPES,
                                'train.gamma_num_range': (0.6, 1.0),
                                'model.score_normalization': 'softmax',
                                'data.subject_reference': 'self'},
}

# How each adapter's rows are named: 'realcustom' + suffix, 'no_scoring' + suffix, ...
_ROW_SUFFIX = {'adaptive': '', 'none': '', 'adaptive_ref': '_ref', 'none_ref': '_ref'}


def adapter_runs(config) -> dict[str, dict[str, str]]:
  """The adapters to train: name -> config overrides."""
  return {name: ADAPTER_RUNS[name] for name in config.toy.adapters}


def adapter_seeds(config) -> tuple[int, ...]:
  return tuple(int(s) for s in config.toy.adapter_seeds)


def uses_stored_reference(overrides: dict[str, str]) -> bool:
  return overrides.get('data.subject_reference') == 'stored'


def id2_adapter(config) -> str | None:
  """The unscored adapter (Table 3 ID-2) trained on the same kind of reference as the
  main adapter: the target's comparison. None when the run trains none."""
  stored = uses_stored_reference(ADAPTER_RUNS[config.toy.main_adapter])
  return next((a for a in config.toy.adapters if not is_scored(a)
               and uses_stored_reference(ADAPTER_RUNS[a]) == stored), None)


def is_scored(adapter: str) -> bool:
  """Whether the adapter has the scoring module (Eqs. 5-10)."""
  return ADAPTER_RUNS[adapter].get('model.scoring', 'adaptive') == 'adaptive'


def row_suffix(adapter: str) -> str:
  return _ROW_SUFFIX.get(adapter, f'_{adapter}')


def num_subject_tokens(config) -> int:
  """The subject encoder's patch count: 16 for the random tower (16 px, patch 4), 64 for
  the contrastive one (patch 2)."""
  vision = (config.toy.encoder.vision if config.toy.subject_encoder == 'contrastive'
            else config.tiny.vision)
  return (int(vision['image_size']) // int(vision['patch_size'])) ** 2


@dataclasses.dataclass(frozen=True)
class Variant:
  """One inference setting of the comparison.

  Attributes:
    name: its key in the results.
    adapter: which trained adapter (a key of ADAPTER_RUNS); '' = plain T2I. Sampled
      with each of its training seeds.
    gamma_scope: Eq. 11's ratio.
    binary: binary scope (top-k ones) instead of the soft scope.
    prompt: 'plain' (the real word only) or 'named' (the caption naming the identity).
    guidance_image: w_i, or None for the config's.
    fusion: the score fusion at inference (Table 3 IDs 3-5 swapped in), or None for the
      adapter's own.
    gamma_num: Eq. 10's ratio, or None for the config's (the paper's 0.8).
    priority: a fixed token order for Eq. 10 ('oracle', 'anti_oracle', 'random';
      toy/selection_gate.py), or None for the learned scores.
    gain: Eq. 9's (1 + S) scaling on (False: an inference-time ablation).
    visual_pool: Eq. 6's positions at inference ('paper', 'scope'), or None for the
      config's.
  """
  name: str
  adapter: str = 'adaptive'
  gamma_scope: float = 0.25
  binary: bool = False
  prompt: str = 'plain'
  guidance_image: float | None = None
  fusion: str | None = None
  gamma_num: float | None = None
  priority: str | None = None
  gain: bool = True
  visual_pool: str | None = None

  @property
  def scope(self) -> str:
    if not self.adapter:
      return '-'
    if self.binary and self.gamma_scope >= 1.0:
      return 'all ones'
    return 'binary' if self.binary else 'soft'

  @property
  def scored(self) -> bool:
    return bool(self.adapter) and is_scored(self.adapter)

  @property
  def model_key(self) -> tuple:
    """The model it samples with: its adapter and the inference-time swaps."""
    return (self.adapter, self.fusion, self.gain, self.visual_pool)


def variants(config) -> list[Variant]:
  """Every row of the comparison.

  Plain T2I (real word, naming caption); for each trained adapter its paper setting
  (Sec. 4.1) and the gamma_num sweep (Table 3 IDs 6-7); Gate A's fixed selections, Eq.
  9's gain off and Eq. 6 pooled inside the scope for `gate_a_adapters`; ID-2 with and
  without mask; on the main adapter no mask at several w_i, the gamma_scope sweep,
  binary scope and the inference-time fusion swaps.
  """
  toy = config.toy
  main = toy.main_adapter
  n = num_subject_tokens(config)
  out = [Variant('plain_t2i', adapter=''),
         Variant('named_prompt', adapter='', prompt='named'),
         # Binary top-k at gamma 1 keeps every position: the scope is all ones, so Eq. 12
         # gates nothing and z_t is not masked: RealCustom without mask guidance.
         Variant('no_mask', adapter=main, gamma_scope=1.0, binary=True)]
  for adapter in toy.adapters:
    sfx = row_suffix(adapter)
    if not is_scored(adapter):
      out += [Variant(f'no_scoring{sfx}', adapter=adapter),
              Variant(f'no_scoring_no_mask{sfx}', adapter=adapter, gamma_scope=1.0,
                      binary=True)]
      continue
    out.append(Variant(f'realcustom{sfx}', adapter=adapter))
    out += [Variant(f'gamma_num_{g:g}{sfx}', adapter=adapter, gamma_num=float(g))
            for g in toy.gamma_nums]
    if adapter in toy.gate_a_adapters:
      for spec in toy.fixed_selections:
        kind, ratio = spec.split(':')
        k = selection_gate.kept_count(float(ratio), n)
        out.append(Variant(f'{kind}_k{k}{sfx}', adapter=adapter, gamma_num=float(ratio),
                           priority=kind))
      out += [Variant(f'gain_off{sfx}', adapter=adapter, gain=False),
              Variant(f'scope_pool{sfx}', adapter=adapter, visual_pool='scope')]
  out += [Variant(f'no_mask_wi_{w:g}', adapter=main, gamma_scope=1.0, binary=True,
                  guidance_image=float(w)) for w in toy.no_mask_guidance_images]
  out += [Variant(f'gamma_{g:g}', adapter=main, gamma_scope=float(g))
          for g in toy.gamma_scopes if abs(g - 0.25) > 1e-9]
  out.append(Variant('binary_0.25', adapter=main, gamma_scope=0.25, binary=True))
  out += [Variant(f'fusion_{f}_swapped', adapter=main, fusion=f) for f in toy.fusions]
  return out


def main_row(config) -> str:
  """The row of the main adapter at the paper's settings (G3 and the target)."""
  return f'realcustom{row_suffix(config.toy.main_adapter)}'


def variant_info(config, name: str) -> dict:
  """How a result row was sampled (its adapter, scope, gamma, prompt, selection)."""
  by_name = {v.name: v for v in variants(config)}
  v = by_name.get(name)
  if v is None:  # G1 rows and the pseudo-word baselines: plain T2I sampling
    kind = 'g1' if name.startswith('g1_') else 'baseline'
    return {'scoring': kind, 'adapter': '', 'gamma_scope': None, 'scope': '-',
            'prompt': kind, 'selection': '-'}
  scoring = '-' if not v.adapter else ('adaptive' if v.scored else 'none')
  selection = '-'
  if v.scored:
    g = 'config' if v.gamma_num is None else f'{v.gamma_num:g}'
    selection = f'{v.priority or "learned"} @ gamma_num {g}'
  return {'scoring': scoring, 'adapter': v.adapter,
          'gamma_scope': v.gamma_scope if v.adapter else None, 'scope': v.scope,
          'prompt': v.prompt, 'selection': selection}
