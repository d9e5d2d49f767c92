"""FastVMTPipeline with Wan2.2 TI2V-5B-style components (text-to-video): per-token timesteps in WanPipeline, a VAE
compressing space 16x with 48 latent channels. Tiny random components, CPU, torch backends."""
import pytest
import torch
from _utils import assert_rel_close
from _wan_tiny import MAX_SEQUENCE_LENGTH, moving_square_video, single_thread, ti2v_components, transformer_config

from fastvmt import FastVMTPipeline, MotionTransferConfig

HEIGHT, WIDTH, FRAMES = 64, 96, 9  # latents 48 x 3 x 4 x 6: 2 x 3 tokens per frame with patch (1, 2, 2)
MOTION_BLOCK = 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti2v")
    FastVMTPipeline(**ti2v_components()).save_pretrained(str(folder))
    pipeline = FastVMTPipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_per_token_timesteps_all_equal_are_the_scalar_timestep():
    """What lets every pass use a scalar timestep: WanPipeline's text-to-video TI2V timesteps (one value per token,
    all the step's t) give the same output as that scalar."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**transformer_config(in_channels=4, num_layers=2)).eval()
    x = torch.randn(2, 4, 3, 6, 8)
    text = torch.randn(2, 5, 32)
    tokens = 3 * 3 * 4
    with torch.no_grad():
        scalar = model(hidden_states=x, timestep=torch.tensor([640.0, 640.0]), encoder_hidden_states=text,
                       return_dict=False)[0]
        per_token = model(hidden_states=x, timestep=torch.full((2, tokens), 640.0), encoder_hidden_states=text,
                          return_dict=False)[0]
    assert_rel_close(per_token, scalar, 1e-5, "per-token vs scalar timestep")


def test_loads_and_transfers_motion_at_the_16x_vae_geometry(pipe):
    assert pipe.config.expand_timesteps and pipe.vae_scale_factor_spatial == 16
    assert pipe.latent_geometry(FRAMES, HEIGHT, WIDTH) == (3, 4, 6)
    # A gradient at every iteration and a larger step than 0.003 move the tiny random model's loss visibly.
    config = MotionTransferConfig(motion_block=MOTION_BLOCK, guided_steps=1, tile=(1, 2), window=3, reuse_interval=1,
                                  lr_start=0.05, lr_end=0.05, window_weight=0.0, kernel_backend="torch")
    out = pipe(
        prompt="a red circle", reference_video=moving_square_video(FRAMES + 3, HEIGHT, WIDTH, step=4),
        motion_config=config, height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=2,
        max_sequence_length=MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(0),
    )
    assert out.frames.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    assert pipe.guidance_state.gradient_passes == 10
    amf = [record["amf"] for record in pipe.guidance_state.history]
    assert torch.isfinite(torch.tensor(amf)).all() and amf[-1] < 0.9 * amf[0], f"AMF loss did not decrease: {amf}"


def test_sizes_must_be_multiples_of_the_16x_vae_times_the_patch(pipe):
    with pytest.raises(ValueError, match="multiples of 32"):
        pipe.latent_geometry(FRAMES, 48, WIDTH)
