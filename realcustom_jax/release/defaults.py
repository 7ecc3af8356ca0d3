"""The authors' release's inference settings, import-free (configs/release.py reads them
before JAX starts). Sources: github.com/bytedance/RealCustom at 28a718e,
inference/pipeline.py, inference/inference_single_image.py and .sh; configs/release.py
says per key where they disagree and which one is taken.
"""
NUM_STEPS = 25
GUIDANCE = 3.5
MASK_SCOPE = 0.25
MASK_STRATEGY = ('max_norm',)
MASK_REUSED_STEP = 12
HEIGHT, WIDTH = 768, 1024
SOLVER = 'dpm_solver_2s'
# prompts/validation_negative.txt of the release (a plain-text file without a header,
# under the repository's Apache-2.0 license.txt).
NEGATIVE_PROMPT = (
    '(((naked))), deformed, bad anatomy, disfigured, poorly drawn face, mutation, mutated, '
    'extra limb, ugly, disgusting, poorly drawn hands, missing limb, floating limbs, '
    'disconnected limbs, malformed hands, blurry, ((((mutated hands and fingers)))), '
    'watermark, watermarked, oversaturated, censored, distorted hands, amputation, '
    'missing hands, obese, doubled face, double hands')
