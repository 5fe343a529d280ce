"""``python -m steps.config from-fairseq2 FILE [FILE ...] [-o OUT.yaml]``: fairseq2 recipe configs -> one PrefFlow
run config. Notes (what changed in meaning, what does not apply) go to stderr, one line each; errors exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from steps.config.convert import ConfigError
from steps.config.fairseq2_import import GUIDE_NPROC_PER_NODE, convert_files

logger = logging.getLogger(__name__)
EXIT_BAD_INPUT = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steps.config", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser(
        "from-fairseq2",
        help="convert fairseq2 instruction_finetune / preference_finetune recipe configs",
        description="Convert fairseq2 recipe configs (2024 flat keys or 2025 _set_ sections) into one PrefFlow run "
        "config: a recipe without a criterion fills sft, the first with one fills preference, further ones "
        "preference.per_loss. A preference recipe alone whose model is the SFT checkpoint of an earlier run starts "
        "from --sft-model DIR (that checkpoint as a Hugging Face directory).",
    )
    imp.add_argument("files", nargs="+", help="fairseq2 recipe YAML files")
    imp.add_argument("-o", "--output", help="write the PrefFlow config here (default: stdout)")
    imp.add_argument(
        "--nproc-per-node",
        type=int,
        default=GUIDE_NPROC_PER_NODE,
        help=f"GPUs the fairseq2 run used; fairseq2's gradient_accumulation is per GPU (default: "
        f"{GUIDE_NPROC_PER_NODE}, the guide's node)",
    )
    imp.add_argument(
        "--sft-model",
        metavar="DIR",
        help="the Hugging Face directory of the SFT checkpoint a lone preference_finetune recipe starts from "
        "(model: checkpoint_step_N): the run's model.base, its init and reference",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        conversion = convert_files(args.files, args.nproc_per_node, args.sft_model)
    except ConfigError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return EXIT_BAD_INPUT
    for note in conversion.notes:
        print(note.line(), file=sys.stderr)
    text = conversion.yaml()
    if args.output:
        from steps.io import atomic_write_text

        atomic_write_text(args.output, text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
