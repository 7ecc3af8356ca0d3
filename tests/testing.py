"""Test-only helpers. torch is imported inside functions: it is not a library dependency."""
import json
import os

from realcustom_jax.loading import tiny


def save_tiny_pretrained(out_dir: str, config, seed: int = 0) -> tuple[str, str]:
  """Writes tiny random torch models in the real diffusers / transformers layouts.

  The Stable Diffusion directory is what `StableDiffusionPipeline.save_pretrained`
  writes (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), all
  weights as safetensors; the vision directory is a CLIPVisionModel with its
  CLIPImageProcessor config.

  Args:
    out_dir: parent directory; `sd/` and `vision/` are created in it.
    config: the config whose `config.tiny` sizes to use.
    seed: torch seed for the random init.

  Returns:
    (sd_dir, vision_dir).
  """
  import diffusers  # pylint: disable=g-import-not-at-top
  diffusers.utils.logging.set_verbosity_error()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.logging.set_verbosity_error()

  torch.manual_seed(seed)
  sd_dir = os.path.join(out_dir, 'sd')
  vision_dir = os.path.join(out_dir, 'vision')
  tokenizer = tiny.build_tokenizer()
  scheduler_config = {k: v for k, v in tiny.SCHEDULER_CONFIG.items() if k != '_class_name'}
  pipe = diffusers.StableDiffusionPipeline(
      vae=diffusers.AutoencoderKL(**tiny.vae_config(config)).eval(),
      text_encoder=transformers.CLIPTextModel(tiny.text_config(config, tokenizer)).eval(),
      tokenizer=tokenizer,
      unet=diffusers.UNet2DConditionModel(**tiny.unet_config(config)).eval(),
      scheduler=diffusers.DDIMScheduler(**scheduler_config),
      safety_checker=None, feature_extractor=None, image_encoder=None,
      requires_safety_checker=False)
  pipe.save_pretrained(sd_dir, safe_serialization=True)

  vision_config = tiny.vision_config(config)
  transformers.CLIPVisionModel(vision_config).eval().save_pretrained(
      vision_dir, safe_serialization=True)
  size = vision_config.image_size
  transformers.CLIPImageProcessor(
      size={'shortest_edge': size}, crop_size={'height': size, 'width': size}
  ).save_pretrained(vision_dir)
  return sd_dir, vision_dir


def toy_train_config(data_dir, num_images: int = 32, batch_size: int = 8, **overrides):
  """configs/tiny.py training on its generated toy set, prepared under `data_dir`, over
  the 8 fake CPU devices of conftest.py; `overrides` are flattened keys
  (`**{'train.num_steps': 4}`)."""
  from configs import tiny as tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config()
  config.update_from_flattened_dict({
      'data.toy': True, 'data.toy_num_images': num_images, 'data.batch_size': batch_size,
      'data.tfds_data_dir': str(data_dir), 'mesh.data': -1, 'mesh.fsdp': 1, **overrides})
  return config


def load_torch_models(sd_dir: str, vision_dir: str) -> dict:
  """Loads the torch reference models back (for numerical comparisons in tests)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  return dict(
      unet=diffusers.UNet2DConditionModel.from_pretrained(sd_dir, subfolder='unet').eval(),
      vae=diffusers.AutoencoderKL.from_pretrained(sd_dir, subfolder='vae').eval(),
      text_encoder=transformers.CLIPTextModel.from_pretrained(
          os.path.join(sd_dir, 'text_encoder')).eval(),
      vision=transformers.CLIPVisionModel.from_pretrained(vision_dir).eval(),
      image_processor=transformers.CLIPImageProcessor.from_pretrained(vision_dir),
  )


def write_json(path: str, value) -> None:
  """Writes `value` as JSON (tests use it to break configs on purpose)."""
  with open(path, 'w') as f:
    json.dump(value, f)


def wait_until_ready(proc, timeout: float):
  """Reads a served app's merged output on a thread until its 'ready: http://' line.

  Returns:
    (lines, reader): the lines read so far, which the reader thread keeps appending to
    until the output closes (join it to have them all).

  Raises:
    AssertionError: no 'ready' line within `timeout` seconds (with the last lines).
  """
  import threading  # pylint: disable=g-import-not-at-top
  lines, ready = [], threading.Event()

  def read():
    for line in proc.stdout:
      lines.append(line)
      if 'ready: http://' in line:
        ready.set()
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  assert ready.wait(timeout), ''.join(lines[-20:])
  return lines, reader
