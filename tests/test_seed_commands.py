"""The seed README's commands (appendix of the OpenDiT spec), verbatim, on the CPU: each is run as the user types it
in a scratch copy of the repository root, shrunk only by flags appended after it (argparse keeps the last value):

  SHRINK  --max_steps 1 --depth 1 --hidden_size 32 --num_heads 2 --num_workers 0
  OFFLINE --vae TINY_VAE (the default `ema` would download) and, for captioned video, --text_encoder TINY_CLIP
  sample  --num_sampling_steps 2, --ckpt OUR_RUN (for the seed's placeholder path), --labels 0 and --prompt for video
  .sh     the scripts' own 16-frame 256-px clips are shrunk to 4 frames at 64 px (the verbatim train.py command above
          already runs at full size)

GPU only: `--enable_layernorm_kernel --enable_flashattn --mixed_precision fp16` on 8 processes needs 8 CUDA GPUs; on
the CPU it must be refused in one line. Nothing may reach the network (HF offline, proxies pointed at a closed port).
"""
import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHRINK = "--max_steps 1 --depth 1 --hidden_size 32 --num_heads 2 --num_workers 0"
SEED_IMAGE_TRAIN = "torchrun --standalone --nproc_per_node=2 train.py --model DiT-XL/2 --batch_size 2"
SEED_IMAGE_SAMPLE = "python sample.py --model DiT-XL/2 --image_size 256 --ckpt ./model.pt"
SEED_VIDEO_TRAIN = "torchrun --standalone --nproc_per_node=2 train.py --model vDiT-XL/222 --use_video --data_path ./videos/demo.csv --batch_size 1 --num_frames 16 --image_size 256 --frame_interval 3"
SEED_PREPROCESS = "python preprocess.py"
SEED_VIDEO_SAMPLE = "python sample.py --model vDiT-XL/222 --use_video --ckpt ckpt_path --num_frames 16 --image_size 256 --frame_interval 3"
SEED_GPU_TRAIN = "torchrun --standalone --nproc_per_node=8 train.py --model DiT-XL/2 --batch_size 180 --enable_layernorm_kernel --enable_flashattn --mixed_precision fp16"


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    """A scratch working directory laid out like the seed's checkout, a tiny VAE and CLIP, and a shell runner."""
    from opendit.encoders.text import tiny_text_encoder
    from opendit.encoders.vae import tiny_vae

    work = tmp_path_factory.mktemp("seed")
    for name in ("train.py", "sample.py", "preprocess.py", "train_img.sh", "train_video.sh", "sample_img.sh", "sample_video.sh", "videos"):
        os.symlink(os.path.join(ROOT, name), work / name)
    torch.manual_seed(0)
    tiny_vae().model.save_pretrained(work / "tiny_vae")
    clip = tiny_text_encoder(str(work / "tiny_clip"), hidden_size=16)
    env = dict(os.environ, PYTHONPATH=ROOT, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")

    class Seed:
        dir, vae, text = work, str(work / "tiny_vae"), str(clip)

        @staticmethod
        def run(command: str, extra: str = "", env_extra: dict = None):
            result = subprocess.run(f"{command} {extra}", shell=True, capture_output=True, text=True, cwd=work, env={**env, **(env_extra or {})}, timeout=900)
            return result

        @staticmethod
        def ok(command: str, extra: str = "", env_extra: dict = None):
            result = Seed.run(command, extra, env_extra)
            assert result.returncode == 0, f"{command} {extra}\n{result.stderr[-3000:]}"
            return result

        @staticmethod
        def experiment(prefix: str) -> str:
            """The newest experiment folder under ./outputs whose name ends with the model's."""
            names = sorted(n for n in os.listdir(work / "outputs") if n.endswith(prefix))
            return str(work / "outputs" / names[-1])

    return Seed


def test_image_train_then_sample(seed, no_network):
    seed.ok(SEED_IMAGE_TRAIN, f"{SHRINK} --vae {seed.vae}")
    run = seed.experiment("DiT-XL-2")
    out = seed.dir / "samples_img"
    seed.ok(SEED_IMAGE_SAMPLE, f"--ckpt {run} --num_sampling_steps 2 --output {out}")
    assert "grid.png" in os.listdir(out) and len(os.listdir(out)) == 9  # DiT's 8 ImageNet classes + the grid


def test_video_train_then_sample_at_full_size(seed, no_network):
    """vDiT-XL/222 on the demo CSV at 16 frames x 256 px, then sampled to an mp4."""
    seed.ok(SEED_VIDEO_TRAIN, f"{SHRINK} --vae {seed.vae} --text_encoder {seed.text}")
    run = seed.experiment("vDiT-XL-222")
    out = seed.dir / "samples_video"
    seed.ok(SEED_VIDEO_SAMPLE, f"--ckpt {run} --num_sampling_steps 2 --labels 0 --prompt Biking --output {out}")
    (name,) = os.listdir(out)
    from opendit.utils.media import read_video

    assert name.endswith(".mp4") and read_video(str(out / name)).shape == (16, 256, 256, 3)


def test_preprocess_with_a_root(seed, no_network):
    """The seed's preprocess.py had its UCF101 path hard-coded; here the folder is given by appended arguments."""
    from opendit.utils.media import save_video

    for name in ("ApplyEyeMakeup", "YoYo"):
        save_video(torch.zeros(3, 2, 16, 16), str(seed.dir / "ucf" / "train" / name / f"v_{name}_g01_c01.avi"))
    seed.ok(SEED_PREPROCESS, f"ucf101 --root {seed.dir / 'ucf' / 'train'} --output {seed.dir / 'preprocess' / 'ucf101_train.csv'}")
    rows = (seed.dir / "preprocess" / "ucf101_train.csv").read_text().splitlines()
    assert len(rows) == 3 and "Apply Eye Makeup" in rows[1]


SMALL_CLIPS = "--num_frames 4 --image_size 64"


def test_shell_scripts(seed, no_network):
    seed.ok("bash train_img.sh", f"{SHRINK} --vae {seed.vae}")
    img_run = seed.experiment("DiT-XL-2")
    seed.ok("bash train_video.sh", f"{SHRINK} --vae {seed.vae} --text_encoder {seed.text} {SMALL_CLIPS}")
    video_run = seed.experiment("VDiT-XL-1x2x2")
    seed.ok("bash sample_img.sh", f"--ckpt {img_run} --num_sampling_steps 2 --labels 0 --output {seed.dir / 's_img'}")
    assert sorted(os.listdir(seed.dir / "s_img")) == ["0000-class0.png", "grid.png"]
    seed.ok("bash sample_video.sh", f"--num_sampling_steps 2 --labels 0 --prompt Biking --output {seed.dir / 's_vid'}", {"CKPT": video_run})
    assert [n[-4:] for n in os.listdir(seed.dir / "s_vid")] == [".mp4"]


@pytest.mark.skipif(torch.cuda.device_count() >= 8, reason="the CPU refusal; the GPU run is the test below")
def test_gpu_command_is_refused_in_one_line_on_the_cpu(seed):
    result = seed.run(SEED_GPU_TRAIN, f"{SHRINK} --vae {seed.vae}")
    assert result.returncode != 0
    # Every rank prints the line; two ranks writing at once can run their lines together, so split on "error: ".
    errors = {m.strip() for m in re.findall(r"error: (.*?)(?=error: |\n|$)", result.stderr)}
    assert errors == {"--enable_flashattn needs a CUDA GPU and --mixed_precision bf16 or fp16"}, result.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 8, reason="the seed's flash-attention command needs 8 CUDA GPUs")
def test_gpu_command_on_eight_gpus(seed):
    seed.ok(SEED_GPU_TRAIN, f"{SHRINK} --vae {seed.vae}")


def test_commands_are_quoted_verbatim():
    """The strings above are the spec appendix's lines, character for character."""
    spec = os.path.join(ROOT, "..", "shared", "design", "opendit-spec.md")  # shared/ lies beside the checkout (and CI's clone)
    if not os.path.exists(spec):
        pytest.skip("the spec is not in this checkout")
    with open(spec) as f:
        lines = {line.strip() for line in f}
    for command in (SEED_IMAGE_TRAIN, SEED_IMAGE_SAMPLE, SEED_VIDEO_TRAIN, SEED_PREPROCESS, SEED_VIDEO_SAMPLE, SEED_GPU_TRAIN):
        assert command in lines, command
