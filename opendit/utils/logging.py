"""A logger that writes to stdout and log.txt on rank 0 and stays silent elsewhere."""
import logging
import os
import sys
from typing import Optional


def create_logger(logging_dir: Optional[str], is_main: bool = True) -> logging.Logger:
    """Rank 0: timestamped lines to stdout and {logging_dir}/log.txt. Other ranks: a NullHandler."""
    logger = logging.getLogger("opendit")
    logger.handlers.clear()
    logger.propagate = False
    if is_main:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers = [logging.StreamHandler(sys.stdout)]  # stderr stays for errors
        if logging_dir is not None:
            handlers.append(logging.FileHandler(os.path.join(logging_dir, "log.txt")))
        for handler in handlers:
            handler.setFormatter(fmt)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
    return logger
