"""What the paper's trainer reads from each record: the image (and a stored subject
reference) in [-1, 1] and the caption's token ids. A grain transform; `train.input_pipeline`
batches and shards it, `paper_family.train_preprocess` builds it."""
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

# config.data.subject_reference: the training image itself (the paper), or a re-rendered
# reference stored beside it (KEY.ref.* in the shards).
SUBJECT_REFERENCES = ('self', 'stored')


def stored_reference(config) -> bool:
  """Whether the adapter reads each sample's stored reference instead of the image."""
  return config.data.get('subject_reference', 'self') == 'stored'


def tokenize_caption(tokenizer, caption: str) -> np.ndarray:
  """Caption -> fixed-length ids; long LAION captions are cut without a warning each."""
  return tokenizer(caption, padding='max_length', max_length=tokenizer.model_max_length,
                   truncation=True, return_tensors='np').input_ids[0].astype(np.int32)


class TrainPreprocess(grain.transforms.Map):
  """Scales the image (and a stored subject reference) to [-1, 1] and tokenizes the
  caption."""

  def __init__(self, tokenize_fn: Callable[[str], np.ndarray]):
    self._tokenize_fn = tokenize_fn

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    caption = element['caption']
    if isinstance(caption, bytes):  # tfds Text features decode to bytes
      caption = caption.decode('utf-8')
    input_ids = np.asarray(self._tokenize_fn(caption), dtype=np.int32)
    if input_ids.ndim != 1:
      raise ValueError(
          f'tokenize_fn must return a 1-D array, got shape {input_ids.shape}')
    image = np.asarray(element['image'], dtype=np.float32) / 127.5 - 1.0
    out = {'image': image, 'input_ids': input_ids}
    if 'reference' in element:  # a set prepared with references (subject_reference)
      out['reference'] = np.asarray(element['reference'], dtype=np.float32) / 127.5 - 1.0
    return out
