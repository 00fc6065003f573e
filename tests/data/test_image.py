"""Image datasets: ADM centre crop, class folders, a local CIFAR-10 copy, captioned image CSVs."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from opendit.errors import UsageError
from opendit.data.image import Cifar10Dataset, ImageCSVDataset, ImageFolderDataset
from opendit.data.transforms import center_crop_arr


def test_adm_center_crop_halves_then_bicubic(media, tmp_path):
    image = Image.open(media.image(tmp_path / "wide.png", 300, 200))
    expected = image.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)  # 200 >= 2 * 64 once; then 100 -> 64
    out = center_crop_arr(image, 64)
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out, np.asarray(expected)[:, 16:80])
    assert center_crop_arr(Image.new("RGB", (32, 32), (9, 99, 199)), 48).shape == (48, 48, 3)  # CIFAR-sized: upscaled
    assert center_crop_arr(Image.new("RGB", (17, 40)), 15).shape == (15, 15, 3)  # odd size, portrait


def test_image_folder_sorted_classes_and_items(tmp_path, media):
    for name in ("zebra", "cat", "dog"):
        media.image(tmp_path / name / "a.png", 40, 30)
    media.image(tmp_path / "cat" / "nested" / "b.jpg", 20, 50)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(str(tmp_path), image_size=16)
    assert ds.classes == ["cat", "dog", "zebra"] and ds.num_classes == 3 and len(ds) == 4
    assert [label for _, label in ds.samples] == [0, 0, 1, 2]
    item = ds[2]
    assert item["x"].shape == (3, 16, 16) and item["y"] == 1 and "text" not in item
    assert -1 <= item["x"].min() and item["x"].max() <= 1


def test_random_flip_is_a_mirror(tmp_path, media):
    media.image(tmp_path / "c" / "ramp.png", 16, 16)
    ds = ImageFolderDataset(str(tmp_path), 16, train=True)
    plain = ImageFolderDataset(str(tmp_path), 16, train=False)[0]["x"]
    seen = {bool(torch.equal(ds[0]["x"], plain)) for _ in range(20)}
    assert seen == {True, False}
    assert any(torch.equal(ds[0]["x"], plain.flip(-1)) for _ in range(20))


def test_empty_folders_are_errors(tmp_path):
    with pytest.raises(UsageError, match="no class sub-folders"):
        ImageFolderDataset(str(tmp_path), 16)
    (tmp_path / "cls").mkdir()
    with pytest.raises(UsageError, match="no images"):
        ImageFolderDataset(str(tmp_path), 16)


def write_cifar(root, per_batch=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), "labels": [(i + j) % 10 for j in range(per_batch)]}
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_cifar10_from_a_local_copy(tmp_path):
    folder = write_cifar(tmp_path)
    ds = Cifar10Dataset(str(tmp_path), image_size=32, train=False)
    assert len(ds) == 15 and ds.num_classes == 10
    with open(folder / "data_batch_2", "rb") as f:
        raw = pickle.load(f)
    item = ds[4]  # batch 2, image 1
    expected = torch.from_numpy(raw["data"][1].reshape(3, 32, 32)).float() / 127.5 - 1
    assert item["y"] == 3 and torch.allclose(item["x"], expected)
    assert Cifar10Dataset(str(folder), image_size=64)[0]["x"].shape == (3, 64, 64)  # the batches folder itself works too


def test_cifar10_errors_and_no_code_execution(tmp_path):
    with pytest.raises(UsageError, match="cifar-10-batches-py/data_batch_1"):
        Cifar10Dataset(str(tmp_path), 32)
    folder = write_cifar(tmp_path)
    os.remove(folder / "data_batch_5")
    with pytest.raises(UsageError, match="lacks data_batch_5"):
        Cifar10Dataset(str(tmp_path), 32)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "data_batch_5", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(UsageError, match="refusing to load"):
        Cifar10Dataset(str(tmp_path), 32)


def test_image_csv_with_captions_and_labels(tmp_path, media):
    media.image(tmp_path / "img" / "a.png", 30, 20)
    media.image(tmp_path / "img" / "b.jpg", 20, 30)
    (tmp_path / "t2i.csv").write_text("img/a.png,a ramp,1\nimg/b.jpg,\"another, ramp\",0\n")
    ds = ImageCSVDataset(str(tmp_path / "t2i.csv"), image_size=16, num_classes=2)
    assert ds.has_text and ds.num_classes == 2
    assert ds[1]["text"] == "another, ramp" and ds[1]["y"] == 0 and ds[1]["x"].shape == (3, 16, 16)
    (tmp_path / "nolabel.csv").write_text("img/a.png,a ramp\n")
    assert "y" not in ImageCSVDataset(str(tmp_path / "nolabel.csv"), 16)[0]
    (tmp_path / "clips.csv").write_text("x.mp4,a clip\n")
    with pytest.raises(UsageError, match="is a video; add --use_video"):
        ImageCSVDataset(str(tmp_path / "clips.csv"), 16)
