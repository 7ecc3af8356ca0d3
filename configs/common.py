"""Config sections both model families share (data, training loop, devices, evaluation),
with the embedded default's values: configs/laion.py (the paper) and
configs/release_train.py (the release's architecture) build on them and set what they
change. Sections, not whole configs: each family's config says what is its own.
"""
import ml_collections


def data_config() -> ml_collections.ConfigDict:
  """Training data (train/input_pipeline.py)."""
  data = ml_collections.ConfigDict()
  data.toy = True  # generate coloured-shape shards instead of reading LAION
  data.toy_num_images = 256
  data.shards_dir = ''  # img2dataset webdataset shards (.tar); unused when toy
  data.tfds_data_dir = ''  # '' = <workdir>/tfds
  data.aesthetic_field = 'aesthetic'  # key in each sample's .json
  data.min_aesthetic = 0.0  # <= 0 disables the filter
  # The subject image the adapter reads in training: 'self' (the paper: the training
  # image itself) or 'stored' (each sample's `KEY.ref.<ext>` in the shards: the same
  # subject in another scene, so the reference's context stops predicting the target's).
  data.subject_reference = 'self'
  data.batch_size = 4  # global, across all processes
  data.shuffle_seed = 0
  data.worker_count = 0  # grain worker processes
  # True: run the frozen VAE / CLIP encoders once over the prepared set and train on their
  # stored outputs (train/precompute.py): faster steps, no encoders on the devices, for
  # disk (0.71 MB per 512 px image at SD 1.5 + ViT-L/14 in float16, several JPEGs' worth).
  # Rerunning reuses the stored features; changed encoders or settings prepare new ones.
  data.precompute_features = False
  data.feature_dtype = 'float16'  # stored features: 'float16' | 'bfloat16' | 'float32'
  return data


def train_config() -> ml_collections.ConfigDict:
  """The training loop's keys (train/train.py); each family adds its own."""
  train = ml_collections.ConfigDict()
  train.num_steps = 20
  train.learning_rate = 1e-4
  train.weight_decay = 0.01  # AdamW
  train.adam_b1 = 0.9
  train.adam_b2 = 0.999
  train.warmup_steps = 0
  train.grad_clip_norm = 0.0  # 0 = no clipping
  # A checkpoint that does not restore (truncated file, corrupt metadata): 'fall_back'
  # sets it aside as STEP.damaged and resumes from the newest one that restores;
  # 'stop' ends the run with one line instead.
  train.on_damaged_checkpoint = 'fall_back'
  # 'zero_v': to_v_visual starts at zero, so the visual branch starts silent; 'copy_text':
  # both visual K/V copied from the text K/V (IP-Adapter). realcustom_jax/adapter.py says
  # why zero is the default (measured on the toy base).
  train.visual_kv_init = 'zero_v'
  train.frozen_dtype = 'float32'  # storage dtype of the frozen UNet / VAE / CLIP
  train.checkpoint_every = 10
  train.max_to_keep = 3
  train.log_every = 1
  train.debug_nan_step = -1  # >= 0: feed NaN images at that step (tests the guard)
  return train


def mesh_config() -> ml_collections.ConfigDict:
  """Devices."""
  mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all devices not used by the other axis
  mesh.fsdp = 1
  mesh.distributed = False  # jax.distributed.initialize() (pods, multi-host GPU)
  return mesh


def eval_config() -> ml_collections.ConfigDict:
  """DreamBench evaluation (sample/evaluate.py), for either family."""
  ev = ml_collections.ConfigDict()
  ev.clip_model = ''  # CLIP ViT-B/32 dir; '' = tiny random (scores meaningless)
  ev.dino_model = ''  # DINO ViT-S/16 dir; '' = tiny random
  ev.images_per_prompt = 1
  ev.subject_image_index = 0
  ev.prompt_limit = 0  # 0 = all prompts
  ev.seed = 0
  return ev
