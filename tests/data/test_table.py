"""The OpenDiT CSV: with and without a header, with labels, paths resolved beside the CSV or from the working folder."""

import os

import pytest

from opendit.errors import UsageError
from opendit.data.table import check_labels, read_table


def write(path, text):
    path.write_text(text)
    return str(path)


def test_headerless_like_opendit_demo(tmp_path, monkeypatch):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "lagos.mp4").write_bytes(b"")
    (tmp_path / "videos" / "beside.mp4").write_bytes(b"")
    csv = write(tmp_path / "videos" / "demo.csv", "./videos/lagos.mp4,lagos\nbeside.mp4,man on the cloud\n/abs/x.mp4,a, b, c\n")
    monkeypatch.chdir(tmp_path)  # OpenDiT's rows are relative to the repository root
    rows = read_table(csv)
    assert [r.path for r in rows] == [os.path.abspath("videos/lagos.mp4"), str(tmp_path / "videos" / "beside.mp4"), "/abs/x.mp4"]
    assert [r.caption for r in rows] == ["lagos", "man on the cloud", "a, b, c"]  # unquoted commas stay in the caption
    assert [r.label for r in rows] == [None, None, None] and [r.line for r in rows] == [1, 2, 3]


def test_header_and_labels(tmp_path):
    csv = write(tmp_path / "d.csv", "path,caption,label\na.mp4,\"Apply, Eye\",0\n\nb.mp4,Yo Yo,7\n")
    rows = read_table(csv)
    assert [(os.path.basename(r.path), r.caption, r.label, r.line) for r in rows] == [("a.mp4", "Apply, Eye", 0, 2), ("b.mp4", "Yo Yo", 7, 4)]
    headerless = read_table(write(tmp_path / "e.csv", "a.mp4,Apply Eye,0\nb.mp4,Yo Yo,7\n"))
    assert [r.label for r in headerless] == [0, 7]
    assert read_table(write(tmp_path / "f.csv", "caption,path\nhello,a.png\n"))[0].caption == "hello"  # columns by name
    with pytest.raises(UsageError, match=r"d.csv row 4: label 7 is outside \[0, --num_classes 5\)"):
        check_labels(rows, 5, csv)


@pytest.mark.parametrize("text, message", [
    ("just_a_path.mp4\n", "row 1: expected path,caption"),
    ("path,label\na.mp4,1\n", "row 1: the header path,label has no caption column"),
    ("path,caption\na.mp4,x,extra\n", "row 2: 3 columns where the header has 2"),
    ("path,caption,label\na.mp4,x,seven\n", "row 2: label 'seven' is not an integer"),
    ("a.mp4,x,1\nb.mp4,y\n", "row 2: no label, while other rows have one"),
    ("\n\n", "no rows"),
])
def test_malformed_csvs_name_the_row(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        read_table(write(tmp_path / "bad.csv", text))


def test_file_caption_label_header_and_latin1_fallback(tmp_path, caplog):
    from opendit.data.table import read_table

    (tmp_path / "h.csv").write_text("file,caption,label\na.png,a cat,1\n")
    (row,) = read_table(str(tmp_path / "h.csv"))
    assert row.caption == "a cat" and row.label == 1 and row.line == 2
    (tmp_path / "l.csv").write_bytes(b"a.png,caf\xe9\n")
    (row,) = read_table(str(tmp_path / "l.csv"))
    assert row.caption == "café" and "row 1: not UTF-8 (byte 0xe9); reading the file as Latin-1" in caplog.text


def test_fp16_refused_on_a_cpu_only_machine_without_device_flag(monkeypatch):
    import pytest as _pytest

    from opendit.errors import UsageError
    from opendit.training.args import check_flags, get_parser

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with _pytest.raises(UsageError, match="fp16 needs a GPU"):
        check_flags(get_parser().parse_args(["--mixed_precision", "fp16"]), 1)
