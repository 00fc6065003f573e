"""Clips from real video files written with PyAV: containers, frame rates, odd and portrait sizes, seeking, short and
broken files, and the video CSV dataset."""

import numpy as np
import pytest
import torch

from opendit.data.video import VideoCSVDataset, _decode_seeking, clip_indices, read_clip

FILES = {  # name: (codec, width, height, fps, frames, pix_fmt)
    "h264.mp4": ("libx264", 64, 48, 24, 30, "yuv420p"),
    "vp8.webm": ("libvpx", 64, 48, 30, 30, "yuv420p"),
    "xvid.avi": ("mpeg4", 64, 48, 25, 30, "yuv420p"),
    "odd.mp4": ("libx264", 63, 37, 29.97, 20, "yuv444p"),
    "portrait.mp4": ("libx264", 48, 96, 12.5, 25, "yuv420p"),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory, media):
    folder = tmp_path_factory.mktemp("videos")
    return {name: media.video(folder / name, frames, w, h, fps, codec, pix) for name, (codec, w, h, fps, frames, pix) in FILES.items()}


def test_clip_indices_window_and_short_policy():
    assert clip_indices(30, 4, 3, 0.0).tolist() == [0, 3, 6, 9]
    assert clip_indices(30, 4, 3, 1.0).tolist() == [20, 23, 26, 29]
    assert clip_indices(8, 4, 3, 0.5).tolist() == [0, 2, 5, 7]  # too short for stride 3: spread over the video
    assert clip_indices(3, 5, 1, 0.5).tolist() == [0, 1, 2, 0, 1]  # fewer frames than the clip: loop
    with pytest.raises(ValueError, match="fewer than the 10"):
        clip_indices(8, 4, 3, 0.5, short="skip")
    with pytest.raises(ValueError, match="no video frames"):
        clip_indices(0, 4, 1, 0.5)


@pytest.mark.parametrize("name", list(FILES))
def test_reads_the_right_frames_from_every_container(videos, media, name):
    frames = FILES[name][4]
    for start, first in ((0.0, 0), (1.0, frames - 10)):
        clip = read_clip(videos[name], 4, 3, 16, start)
        assert clip.shape == (4, 16, 16, 3) and clip.dtype == np.uint8
        assert media.ids(clip) == [first, first + 3, first + 6, first + 9], name


def test_seeks_instead_of_decoding_the_whole_file(tmp_path, media):
    import av

    path = media.video(tmp_path / "long.mp4", 150, 32, 32, 25, gop=10)
    decoded = []

    class Counting:
        """The real container, counting the frames it decodes."""

        def __init__(self, container):
            self.container = container

        def seek(self, *args, **kwargs):
            return self.container.seek(*args, **kwargs)

        def decode(self, stream):
            for frame in self.container.decode(stream):
                decoded.append(frame.pts)
                yield frame

    with av.open(path) as container:
        stream = container.streams.video[0]
        clip = _decode_seeking(Counting(container), stream, np.arange(140, 148, 2), 16)
    assert media.ids(clip) == [140, 142, 144, 146]
    assert len(decoded) <= 20  # back to the key frame at 140 at most, never the 140 frames before it


def test_short_videos_loop_or_fail(tmp_path, media):
    path = media.video(tmp_path / "short.mp4", 3, 32, 32, 10)
    assert media.ids(read_clip(path, 5, 2, 16)) == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="fewer than"):
        read_clip(path, 5, 2, 16, short="skip")


def test_truncated_and_garbage_files_raise(tmp_path, videos):
    data = open(videos["h264.mp4"], "rb").read()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for name in ("truncated.mp4", "garbage.mp4", "missing.mp4"):
        with pytest.raises(Exception):
            read_clip(str(tmp_path / name), 4, 1, 16)
    webm = open(videos["vp8.webm"], "rb").read()  # a cut webm keeps its first frames: still a clip, or an error
    (tmp_path / "cut.webm").write_bytes(webm[: len(webm) * 2 // 3])
    try:
        assert read_clip(str(tmp_path / "cut.webm"), 4, 1, 16, 1.0).shape == (4, 16, 16, 3)
    except Exception:
        pass


def test_video_csv_dataset_items(tmp_path, videos, media):
    csv = tmp_path / "clips.csv"
    csv.write_text(f"path,caption,label\n{videos['h264.mp4']},a flat clip,3\n{videos['portrait.mp4']},\"tall, flat\",1\n")
    ds = VideoCSVDataset(str(csv), image_size=16, num_frames=5, frame_interval=2, train=True, num_classes=4)
    assert len(ds) == 2 and ds.has_text and not ds.is_latent and ds.num_classes == 4
    torch.manual_seed(0)
    item = ds[1]
    assert item["x"].shape == (3, 5, 16, 16) and item["x"].dtype == torch.float32
    assert -1 <= item["x"].min() and item["x"].max() <= 1
    assert item["text"] == "tall, flat" and item["y"] == 1
    ids = media.ids(item["x"])
    assert np.diff(ids).tolist() == [2, 2, 2, 2] and 0 <= ids[0] <= 25 - 9  # a random window, stride 2
    middle = VideoCSVDataset(str(csv), 16, 5, 2, train=False, num_classes=4)[0]
    assert media.ids(middle["x"]) == [10, 12, 14, 16, 18]  # evaluation: the middle window, no flip
