"""``lmtrain checkpoint consolidate CKPT.dcp [OUT.pt]``: a sharded checkpoint (PARALLEL=fsdp)
as one file that every other command reads."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmtrain.cli import add_base_flag

    parser = subparsers.add_parser("checkpoint", help="work with checkpoints (consolidate)",
                                   description="Work with checkpoints.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    merge = actions.add_parser(
        "consolidate", help="a sharded checkpoint (PARALLEL=fsdp) as one .pt file",
        description="Gather a sharded checkpoint folder (step_N.dcp, written by PARALLEL=fsdp "
                    "runs at any number of processes) into one .pt checkpoint that sample, "
                    "eval, export, inspect and PARALLEL=ddp resumes read. Runs in one process.")
    merge.add_argument("checkpoint", metavar="CKPT", help="a step_N.dcp folder")
    merge.add_argument("out", metavar="OUT", nargs="?", default=None,
                       help="the .pt file to write (default: step_N.pt beside CKPT; never "
                            "replaced)")
    add_base_flag(merge)
    merge.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmtrain.cli import base_override
    from lmtrain.consolidate import consolidate

    run_, path = consolidate(args.checkpoint, args.out, base=base_override(args))
    print(f"consolidated step {run_.step} (written by {run_.world_size} process(es)) into "
          f"{path}")
    return 0
