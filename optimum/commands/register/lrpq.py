"""`optimum-cli lrpq ...`: the `optimum-lrpq` commands as an optimum-cli subcommand.

optimum-cli imports every module of the `optimum.commands.register` namespace package at start-up (this folder has
no `__init__.py`, PEP 420) and registers their `REGISTER_COMMANDS`. This module therefore imports nothing heavy: the
arguments are handed unparsed to `optimum_lrpq.cli.main`, which imports torch/transformers only when a command runs.

    optimum-cli lrpq demo
    optimum-cli lrpq quantize MODEL --dataset NAME_OR_DIR --mixed-precision --output DIR
    optimum-cli lrpq evaluate DIR --dataset NAME_OR_DIR --baseline MODEL
    optimum-cli lrpq inspect DIR
    optimum-cli lrpq export DIR --format onnx
"""

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

_DESCRIPTION = """\
LRP-QViT post-training quantization of vision transformers (optimum-lrpq); same commands as `optimum-lrpq`:

  quantize   quantize a model and save it (model, image processor, model card, bits plot)
  evaluate   top-1 accuracy and throughput, optionally next to the float model (--baseline)
  inspect    print the per-layer bits and relevance of a quantized model and plot them
  export     write a quantized model as a QDQ ONNX model for ONNX Runtime (integer GEMMs)
  demo       quantize the shipped MNIST ViT at W4/A4 mixed precision and compare (offline, seconds)

Run `optimum-cli lrpq <command> --help` for the options of a command."""


class LRPQCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="lrpq", help="LRP-QViT quantization of vision transformers (optimum-lrpq)")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.description = _DESCRIPTION
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.usage = "optimum-cli lrpq [-h] {quantize,evaluate,inspect,export,demo} ..."
        parser.add_argument("lrpq_args", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                            help="an optimum-lrpq command and its arguments")

    def run(self) -> None:
        from optimum_lrpq.cli import main

        status = main(self.args.lrpq_args, prog="optimum-cli lrpq")
        if status:
            sys.exit(status)


REGISTER_COMMANDS = [LRPQCommand]
