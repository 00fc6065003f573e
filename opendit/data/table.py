"""The OpenDiT CSV: rows `path,caption[,label]`, with or without a header, paths resolved against the CSV's folder.

Without a header the columns are positional: path, caption, and a label when the last of three or more fields is an
integer; extra fields are commas of an unquoted caption and are joined back. With a header (a first row naming a
`path` column) the columns are taken by name: path, caption (or text), label (optional).
"""

import csv
import logging
import os
from dataclasses import dataclass
from typing import Optional

from opendit.errors import UsageError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Row:
    """One CSV row: the resolved media path, its caption, its label (None when the CSV has none), its line number."""

    path: str
    caption: str
    label: Optional[int]
    line: int


def _int(text: str) -> Optional[int]:
    try:
        return int(text.strip())
    except ValueError:
        return None


def resolve(path: str, folder: str) -> str:
    """A relative path is looked up next to the CSV first, then from the working directory (./videos/x.mp4 rows)."""
    path = os.path.expanduser(path.strip())
    if os.path.isabs(path):
        return path
    beside = os.path.normpath(os.path.join(folder, path))
    if os.path.exists(beside) or not os.path.exists(path):
        return beside
    return os.path.abspath(path)


def _parse_positional(fields: list, where: str) -> tuple:
    if len(fields) < 2:
        raise UsageError(f"{where}: expected path,caption[,label], got {len(fields)} column")
    label = _int(fields[-1]) if len(fields) >= 3 else None
    caption = ",".join(fields[1:-1] if label is not None else fields[1:])
    return fields[0], caption, label


def _parse_named(record: dict, where: str) -> tuple:
    caption = record.get("caption", record.get("text"))
    if not record.get("path") or caption is None:
        raise UsageError(f"{where}: missing path or caption")
    label = record.get("label")
    if label not in (None, "") and _int(label) is None:
        raise UsageError(f"{where}: label {label!r} is not an integer")
    return record["path"], caption, None if label in (None, "") else _int(label)


PATH_ALIASES = {"file": "path", "filename": "path", "file_name": "path", "video": "path", "image": "path", "video_path": "path", "image_path": "path"}
HEADER_NAMES = {"path", "caption", "text", "label", *PATH_ALIASES}


def _is_header(fields: list) -> bool:
    """A first row naming columns (path or an alias such as file, plus caption/text/label), not a media file."""
    names = [s.strip().lower() for s in fields]
    return any(name in ("path", *PATH_ALIASES) for name in names) and set(names) <= HEADER_NAMES | {""}


def _text_lines(csv_path: str) -> list:
    """The CSV's lines, read as UTF-8; a file that is not UTF-8 is read as Latin-1 with a one-line warning."""
    with open(csv_path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        row = data[: e.start].count(b"\n") + 1
        logging.getLogger("opendit").warning(f"{csv_path} row {row}: not UTF-8 (byte 0x{data[e.start]:02x}); reading the file as Latin-1")
        text = data.decode("latin-1")
    return text.splitlines(keepends=True)


def read_table(csv_path: str) -> list:
    """All rows of a CSV as Row objects; a one-line UsageError naming the file and row on any malformed row."""
    if not os.path.isfile(csv_path):
        raise UsageError(f"--data_path {csv_path}: no such CSV file")
    folder = os.path.dirname(os.path.abspath(csv_path))
    lines = [(n, fields) for n, fields in enumerate(csv.reader(_text_lines(csv_path)), start=1) if any(s.strip() for s in fields)]
    header = None
    if lines and _is_header(lines[0][1]):
        header = [PATH_ALIASES.get(s.strip().lower(), s.strip().lower()) for s in lines.pop(0)[1]]
        if "caption" not in header and "text" not in header:
            raise UsageError(f"{csv_path} row 1: the header {','.join(header)} has no caption column")
    rows = []
    for n, fields in lines:
        where = f"{csv_path} row {n}"
        if header is not None:
            if len(fields) != len(header):
                raise UsageError(f"{where}: {len(fields)} columns where the header has {len(header)}")
            path, caption, label = _parse_named(dict(zip(header, fields)), where)
        else:
            path, caption, label = _parse_positional(fields, where)
        rows.append(Row(resolve(path, folder), caption.strip(), label, n))
    if not rows:
        raise UsageError(f"{csv_path}: no rows")
    labelled = [r.label is not None for r in rows]
    if any(labelled) and not all(labelled):
        row = rows[labelled.index(False)]
        raise UsageError(f"{csv_path} row {row.line}: no label, while other rows have one")
    return rows


def check_labels(rows: list, num_classes: int, source: str) -> None:
    """Every label must index the model's label table: a one-line error naming the first row that does not."""
    for row in rows:
        if row.label is not None and not 0 <= row.label < num_classes:
            raise UsageError(f"{source} row {row.line}: label {row.label} is outside [0, --num_classes {num_classes})")


def open_csv(csv_path: str, num_classes: int, video: bool) -> tuple:
    """The rows of an image (video=False) or video CSV, checked: (rows, labelled, num_classes of the data)."""
    rows = read_table(csv_path)
    first = rows[0]
    if is_video(first.path) != video:
        hint = "add --use_video" if is_video(first.path) else "drop --use_video for image CSVs"
        raise UsageError(f"{csv_path} row {first.line}: {os.path.basename(first.path)} is {'a video' if is_video(first.path) else 'not a video file'}; {hint}")
    check_labels(rows, num_classes, csv_path)
    labelled = first.label is not None
    return rows, labelled, num_classes if labelled else 0


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)
