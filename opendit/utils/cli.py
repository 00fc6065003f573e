"""What the entry scripts share on the command line: the --help layout, the usage line, counts and output paths in messages."""
import argparse
import os
from typing import Optional


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default shown once: not when its help already says it, nor for an unset (None), empty or off default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, "", False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# A mistyped flag's error follows this one line instead of every flag's usage (the full list: --help).
USAGE = "%(prog)s [flags]  (%(prog)s --help lists them)"


def plural(count: int, noun: str, nouns: Optional[str] = None) -> str:
    """1 sample, 2 samples; 1 process, 2 processes (nouns: the plural when it is not noun + s)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def file_in_path(folder: str) -> Optional[str]:
    """The file standing where `folder` (or a folder above it) would have to be, so it cannot be used or created; else None."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


def output_folder_problem(flag: str, folder: str, hint: str) -> Optional[str]:
    """Why `folder` cannot be used or made as an output folder, in one line (a file there: `hint` says what to give
    instead; or a file in a folder above it); else None."""
    blocked = file_in_path(folder)
    if blocked is None:
        return None
    if blocked == os.path.abspath(folder):
        return f"{flag} {folder}: is a file; {hint}"
    return f"{flag} {folder}: cannot be made (a file stands in its path)"
