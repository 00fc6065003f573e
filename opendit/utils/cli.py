"""The entry scripts' --help layout."""
import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default shown once: not when its help already says it, nor for an unset (None), empty or off default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, "", False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# A mistyped flag's error follows this one line instead of every flag's usage (the full list: --help).
USAGE = "%(prog)s [flags]  (%(prog)s --help lists them)"
