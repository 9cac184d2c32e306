"""The demo Flux pipeline's fixed choices, shared by its training script and its model card writer."""

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {word}", "the digit {word}")
EVAL_TEMPLATE = TEMPLATES[0]
IMAGE_SIZE = 32
MAX_SEQUENCE_LENGTH = 32
STEPS_AT_INFERENCE = 8
GROUP = 128  # the quantizer's group size: every linear width in the transformer's blocks is a multiple of it

TEXT_DIM = 128  # CLIP hidden size (pooled_projection_dim) = T5 d_model (joint_attention_dim)
LATENT_CHANNELS = 4  # the transformer's in_channels = 4 * LATENT_CHANNELS (2 x 2 packing)
VAE_CHANNELS = (16, 32)  # two blocks: a VAE scale factor of 2
TRANSFORMER = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=4,
                   attention_head_dim=64, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                   pooled_projection_dim=TEXT_DIM, guidance_embeds=False, axes_dims_rope=(16, 24, 24))
# FLUX.1's own scheduler configuration
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)
