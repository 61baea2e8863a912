"""`optimum-lrpq`: quantize, evaluate and inspect vision transformers with LRP-QViT from the command line.

    optimum-lrpq demo                 # quantize the shipped MNIST ViT, offline, in seconds
    optimum-lrpq quantize facebook/deit-small-patch16-224 --dataset imagenet-1k --split train \\
        --weight-bits 4 --activation-bits 4 --mixed-precision --output deit-s-lrpq
    optimum-lrpq quantize MODEL --dataset DIR --config lrpq.json --allocation lrp_sensitivity --output DIR
    optimum-lrpq evaluate deit-s-lrpq --dataset imagenet-1k --split validation --limit 1000 \\
        --baseline facebook/deit-small-patch16-224
    optimum-lrpq inspect deit-s-lrpq
    optimum-lrpq export deit-s-lrpq --format onnx      # QDQ ONNX model for ONNX Runtime: deit-s-lrpq/model.onnx

`optimum-lrpq` without a command prints the help. Models are Hub ids or local directories; datasets are Hub names,
local image folders or `save_to_disk` directories (a name that looks like a local path but is no directory is an
error at once, not a Hub lookup). Errors are reported in one line with exit status 2. Output directories are written
next to their target under a temporary name and renamed into place at the end, so an interrupted run leaves nothing
half written.

torch, transformers and datasets are imported inside the commands, so `--help` and `--version` answer at once. The
same commands are available as `optimum-cli lrpq ...` (see `optimum/commands/register/lrpq.py`).

Layout: `app` (parser, dispatch, exit statuses), `common` (shared loaders, output directories, formatting) and one
module per command (`quantize`, `evaluate`, `inspect`, `export`, `demo`), each with `add_parser(subparsers)` and
`run(args)`.
"""

from .app import main

__all__ = ["main"]
