"""The toy base model resumes exactly and is saved where the real loaders read it."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import toy_world as toy_config
from realcustom_jax.loading import weights
from toy import base as toy_base


def _quadratic_loss(params, key):
  # A batch drawn from the step key, as the real losses do: resuming must replay it.
  target = jax.random.normal(key, params['w'].shape)
  return jnp.mean(jnp.square(params['w'] - target))


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
  init = {'w': jnp.zeros((3,))}
  opt = optax.adam(0.1)
  straight = toy_base._train_loop('q', str(tmp_path / 'a'), init, _quadratic_loss, opt,
                                  num_steps=6, checkpoint_every=2, seed=5)
  toy_base._train_loop('q', str(tmp_path / 'b'), init, _quadratic_loss, opt, num_steps=4,
                       checkpoint_every=2, seed=5)
  resumed = toy_base._train_loop('q', str(tmp_path / 'b'), init, _quadratic_loss, opt,
                                 num_steps=6, checkpoint_every=2, seed=5)
  assert not np.allclose(straight['w'], 0.0)
  np.testing.assert_allclose(resumed['w'], straight['w'], rtol=1e-6)


def test_saved_base_model_loads_through_the_real_loaders(tmp_path):
  config = toy_config.get_config('smoke')
  tokenizer = toy_base.build_tokenizer()
  text_encoder, text_params = toy_base.build_text_encoder(config, tokenizer)
  vae = toy_base.build_vae(config)
  vae_params = jax.jit(vae.init_weights)(jax.random.PRNGKey(0))
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from realcustom_jax.loading import tiny  # pylint: disable=g-import-not-at-top
  unet = FlaxUNet2DConditionModel.from_config(tiny.unet_config(config))
  unet_params = jax.jit(unet.init_weights)(jax.random.PRNGKey(1))
  sd_dir, vision_dir = toy_base.save_pretrained(str(tmp_path), config, unet_params,
                                                vae_params, 0.5, text_params, tokenizer)
  sd = weights.load_stable_diffusion(sd_dir)
  vision = weights.load_vision_encoder(vision_dir)
  assert sd.scaling_factor == 0.5 and sd.vae_scale_factor == 2
  assert vision.image_size == 16 and vision.num_patches == 16
  for got, want in ((sd.unet_params, unet_params), (sd.vae_params, vae_params),
                    (sd.text_params, text_params)):
    jax.tree.map(np.testing.assert_array_equal, got, jax.device_get(want))
  # The saved tokenizer is the world's: caption words stay whole.
  assert sd.tokenizer('a circle on a green background').input_ids == \
      tokenizer('a circle on a green background').input_ids
