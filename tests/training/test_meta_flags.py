"""Meta DiT's hyphenated flags are aliases of train.py's and sample.py's; --global-batch-size is split over the dp ranks."""

import pytest

from opendit.errors import UsageError
from opendit.sampling.sample import get_parser as sample_parser
from opendit.training.args import check_flags, get_parser as train_parser

TRAIN = {"--data-path": ("data_path", "x"), "--image-size": ("image_size", "512"), "--num-classes": ("num_classes", "10"),
         "--global-seed": ("global_seed", "3"), "--results-dir": ("outputs", "res"), "--ckpt-every": ("ckpt_every", "7"),
         "--epochs": ("epochs", "5"), "--log-every": ("log_every", "9"), "--num-workers": ("num_workers", "1"),
         "--model": ("model", "DiT-B/4"), "--vae": ("vae", "mse")}
SAMPLE = {"--image-size": ("image_size", "512"), "--num-classes": ("num_classes", "10"), "--cfg-scale": ("cfg_scale", "1.5"),
          "--num-sampling-steps": ("num_sampling_steps", "50"), "--seed": ("seed", "4"), "--model": ("model", "DiT-B/4"), "--vae": ("vae", "mse")}


def same(parser, flags, base):
    for flag, (dest, value) in flags.items():
        meta = parser.parse_args(base + [flag, value])
        ours = parser.parse_args(base + ["--" + dest, value])
        assert vars(meta) == vars(ours) and str(getattr(meta, dest)) == value, flag


def test_train_aliases():
    same(train_parser(), TRAIN, [])


def test_sample_aliases():
    same(sample_parser(), SAMPLE, ["--ckpt", "c"])


def check(argv, world_size, sp=1):
    args = train_parser().parse_args(argv + ["--vae", "none", "--image_size", "32", "--sequence_parallel_size", str(sp)])
    check_flags(args, world_size)
    return args.batch_size


def test_global_batch_size_is_divided_by_the_data_parallel_size():
    assert check(["--global-batch-size", "8"], 4) == 2
    assert check(["--global-batch-size", "8"], 4, sp=2) == 4  # 2 dp ranks of 2 sp peers
    assert check(["--global-batch-size", "8"], 1) == 8
    with pytest.raises(UsageError, match="multiple of the 3 data-parallel ranks"):
        check(["--global-batch-size", "8"], 3)


def test_global_batch_size_and_batch_size_exclude_each_other():
    assert check([], 4) == 2 and check(["--batch_size", "3"], 4) == 3  # per rank, as before
    with pytest.raises(UsageError, match="give one"):
        check(["--global-batch-size", "8", "--batch_size", "2"], 2)
