"""The txcompile command line: export, optimize, compile, inspect, run, bench, passes.

Exit codes: 0 ok, 1 verification failed, 2 bad input, 3 internal error. Errors are one line on
stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import traceback

from txcompile.graph.errors import TxError, VerificationError
from txcompile.graph.task_metadata import TASK_NAMES

DEFAULT_MODEL = "tiny-bert"


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _id_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token ids") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} needs token ids of 0 or more")
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} needs positive integers")
    return values


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no pass")
    return names


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _tolerance(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; a tolerance is 0 or more")
    return value


def _above_zero(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be above 0")
    return value


def _opset(text: str) -> int:
    """An ONNX opset onnxruntime can run (7 on) and this onnx knows."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    value = _positive(text)
    if not 7 <= value <= newest:
        raise argparse.ArgumentTypeError(f"opset {value} is outside 7–{newest}")
    return value


def _add_shape_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=_positive, help="batch size of the example/verification inputs")
    parser.add_argument("--seq", type=_positive, help="sequence length of the example/verification inputs")
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=AxB",
        help="shape of one input, e.g. pixel_values=1x3x32x32 (repeatable)",
    )


def _add_export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--opset", type=_opset, help="ONNX opset to export with")
    parser.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--dynamic",
        dest="dynamic",
        action="store_true",
        default=True,
        help="dynamic batch and sequence axes (default)",
    )
    group.add_argument("--static", dest="dynamic", action="store_false", help="fix every input shape")
    parser.add_argument(
        "--attn-implementation",
        choices=["eager", "sdpa"],
        help="Hugging Face attention implementation to export",
    )
    parser.add_argument(
        "--task",
        choices=TASK_NAMES,
        help="what a Hugging Face folder's model is for: its head and outputs (default: from "
        "modules.json, else config.architectures)",
    )


def _add_optimize_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="cpu", help="cpu, gpu or he (default cpu)")
    parser.add_argument("--passes", type=_names, help="run exactly these passes, comma-separated")
    parser.add_argument("--disable-pass", type=_names, default=[], action="extend", help="skip these passes")
    parser.add_argument(
        "--atol", type=_tolerance, default=1e-4, help="tolerance for exact passes (default 1e-4)"
    )
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip numeric verification")
    parser.add_argument("--inputs", help="verification inputs (.npz, one array per graph input)")
    _add_timeout_option(parser)
    _add_sparsity_options(parser)
    _add_he_options(parser)
    _add_attention_options(parser)


def _add_timeout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_above_zero,
        metavar="SECONDS",
        help="stop when one onnxruntime run takes longer (a model's own Loop can run for ever); "
        "default no limit",
    )


def _add_attention_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attention-op",
        choices=["ms", "onnx", "gqa"],
        default="ms",
        help="fused attention as com.microsoft MultiHeadAttention (default; on the CPU ONNX Attention "
        "where its kernel is the faster: int8's packed projection, head-split K/V), ONNX Attention "
        "(opset 23), or GroupQueryAttention for causal sites (right-padded batches; fp16/bf16 on CUDA)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when any attention site stays unfused")
    parser.add_argument(
        "--remove-padding",
        action="store_const",
        const=True,
        help="run per-token work on real tokens only (default on --target gpu for encoders, whose "
        "attention is packed too; --disable-pass remove-padding turns it off); padded positions of "
        "outputs become 0",
    )


def _add_he_options(parser: argparse.ArgumentParser) -> None:
    """--target he: polynomial form for CKKS (calibration inputs come from --calib)."""
    parser.add_argument(
        "--he-mode",
        choices=["approx", "power-softmax"],
        help="approx: post-training polynomials (default); power-softmax: softmax → x^p / Σ x^p",
    )
    parser.add_argument("--he-margin", type=_above_zero, help="widen calibrated ranges by this (default 1.5)")
    parser.add_argument("--he-tol", type=_above_zero, help="max error per approximation on its domain (1e-3)")
    parser.add_argument("--he-power", type=_positive, help="even power p of power-softmax (default 4)")
    parser.add_argument(
        "--level-budget", type=_positive, help="CKKS levels available; deeper graphs need bootstrapping"
    )


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 1 (exclusive), e.g. 0.9")
    return value


def _block(text: str) -> str:
    from txcompile.passes.sparsity.blocks import parse_block

    try:
        return str(parse_block(text))
    except TxError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_sparsity_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sparsity", type=_fraction, help="prune every linear layer to this sparsity, e.g. 0.9"
    )
    parser.add_argument(
        "--block",
        type=_block,
        help="pruning block ROWSxCOLS of W[K,N] (default 1x32), or neuron (structured)",
    )
    parser.add_argument(
        "--prune-score", choices=["magnitude", "activation"], help="block score (default magnitude)"
    )
    parser.add_argument(
        "--calib",
        help="calibration inputs (.npz) for --prune-score activation, int8 smoothing and --target he ranges",
    )
    parser.add_argument("--balanced", action="store_true", help="same number of blocks in every column group")
    parser.add_argument(
        "--prune-final", action="store_true", help="also prune the final projection / tied embeddings"
    )
    parser.add_argument(
        "--sparse-decision",
        choices=["measure", "cost", "always"],
        help="how sparse-matmul picks sparse over dense per layer (default measure)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16", "int8", "int4"],
        help="numeric precision: gpu default fp16 (fp16/bf16 where kernels allow), cpu default fp32; "
        "int8: dynamic int8 MatMuls (cpu; with --sparsity, int8 column groups); int4: weight-only",
    )
    parser.add_argument(
        "--min-cosine",
        type=float,
        help="int8/int4: keep the most sensitive MatMuls fp32 until outputs match fp32 this well",
    )
    parser.add_argument(
        "--int8-activations",
        choices=["auto", "token", "tensor"],
        help="int8: activation scales per token, per tensor, or chosen per input by simulated error "
        "(default auto); token makes each row's result independent of the rest of the batch",
    )
    parser.add_argument(
        "--low-precision-io", action="store_true", help="fp16/bf16: graph inputs/outputs in half too"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txcompile", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="export a PyTorch model to ONNX")
    export.add_argument("model", help="built-in name, Hugging Face folder, or path/to/file.py:factory")
    export.add_argument("-o", "--output", required=True)
    _add_export_options(export)
    _add_shape_options(export)

    optimize = commands.add_parser("optimize", help="optimize an ONNX model")
    optimize.add_argument("model", help="input .onnx")
    optimize.add_argument("-o", "--output", required=True)
    _add_optimize_options(optimize)
    _add_shape_options(optimize)

    compile_ = commands.add_parser("compile", help="export and optimize in one step")
    compile_.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"built-in name, Hugging Face folder or file.py:factory (default {DEFAULT_MODEL})",
    )
    compile_.add_argument("-o", "--output", required=True)
    compile_.add_argument("--save-export", help="also keep the plain export here (a baseline for bench)")
    _add_export_options(compile_)
    _add_optimize_options(compile_)
    _add_shape_options(compile_)

    inspect = commands.add_parser("inspect", help="show the pass report of a model or report.json")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--html", help="write the report as HTML to this file")

    run = commands.add_parser("run", help="run a model in onnxruntime")
    run.add_argument("model")
    run.add_argument("--inputs", help="inputs (.npz); random valid inputs otherwise")
    run.add_argument("--device", default="cpu", help="cpu or cuda")
    run.add_argument("--save-outputs", help="write the outputs to this .npz")
    run.add_argument(
        "--text",
        action="append",
        help="run on this text with the tokenizer saved in the model, and print the task's answer "
        "(repeatable; question-answering takes a question, then a context)",
    )
    which = run.add_mutually_exclusive_group()
    which.add_argument("--compare", help="another .onnx to run on the same inputs")
    which.add_argument(
        "--reference",
        nargs="?",
        const="",
        metavar="MODEL",
        help="compare with a PyTorch model: the one named (built-in, folder or file.py:factory), or, "
        "with no value, the built-in this was exported from (code a model names is never run)",
    )
    run.add_argument("--atol", type=_tolerance, default=1e-4)
    _add_timeout_option(run)
    run.add_argument(
        "--encrypted", action="store_true", help="evaluate a polynomial graph under CKKS (TenSEAL)"
    )
    run.add_argument("--level-budget", type=_positive, help="refuse graphs deeper than this many levels")
    _add_shape_options(run)

    bench = commands.add_parser("bench", help="side-by-side latency in onnxruntime")
    bench.add_argument("models", nargs="+")
    bench.add_argument("--batch", type=_int_list, default=[1], help="batch sizes, comma-separated")
    bench.add_argument("--seq", type=_int_list, default=[128], help="sequence lengths, comma-separated")
    bench.add_argument("--threads", type=_positive, help="intra-op threads (default: all cores)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--iters", type=_positive, default=20)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--json", help="also write the timings to this JSON file")

    generate = commands.add_parser("generate", help="generate tokens with a decoder graph and its KV cache")
    generate.add_argument("model", help=".onnx exported with --task text-generation")
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument(
        "--prompt-ids",
        action="append",
        type=_id_list,
        help="a prompt as comma-separated token ids (repeatable)",
    )
    prompts.add_argument("--prompt", action="append", help="a prompt as text (repeatable)")
    generate.add_argument(
        "--tokenizer", help="folder with tokenizer.json (default: the one saved in the model)"
    )
    generate.add_argument("--max-new-tokens", type=_positive, default=32)
    generate.add_argument(
        "--greedy", action="store_true", help="the most likely token each step (the default)"
    )
    generate.add_argument("--temperature", type=float, help="sample at this temperature")
    generate.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    generate.add_argument("--top-p", type=float, help="sample among the most likely tokens summing to p")
    generate.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    generate.add_argument("--eos-id", type=int, action="append", help="end-of-text id (default: the model's)")
    generate.add_argument("--device", default="cpu", help="cpu or cuda")
    generate.add_argument("--threads", type=_positive, help="intra-op threads (default: all cores)")
    generate.add_argument("--json", action="store_true", help="print ids and timings as JSON")

    commands.add_parser("passes", help="list every pass and pipeline")
    return parser


class _OneLine(logging.Formatter):
    """A library's log record as one ``txcompile: level: message`` line; all of it with --debug."""

    def __init__(self, debug: bool):
        super().__init__()
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        line = f"txcompile: {record.levelname.lower()}: {record.name}: {record.getMessage()}"
        if self.debug:
            return line + (f"\n{self.formatException(record.exc_info)}" if record.exc_info else "")
        return line.splitlines()[0][:300]


def _route_library_output(debug: bool) -> None:
    """Library logging and Python warnings through one handler: errors only and no tracebacks
    unless --debug (onnx_ir, for one, logs a traceback when onnx's shape inference gives up)."""
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h.formatter, _OneLine)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine(debug))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _route_library_output(args.debug)
    from txcompile import commands
    from txcompile.graph import ort as rt

    rt.verbose_logs(args.debug)
    try:
        with rt.time_limit(getattr(args, "timeout", None)), commands.showing_progress():
            return getattr(commands, args.command.replace("-", "_"))(args) or 0
    except rt.RunTimeout as err:
        print(f"txcompile: error: {err}", file=sys.stderr)
        return 2
    except VerificationError as err:
        print(f"txcompile: verification failed: {err}", file=sys.stderr)
        return err.exit_code
    except TxError as err:
        if args.debug:
            traceback.print_exc()
        print(f"txcompile: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("txcompile: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        if isinstance(err, OSError) and err.filename is not None:  # a path the user named
            print(f"txcompile: error: {err.filename}: {err.strerror or err}", file=sys.stderr)
            return 2
        line = (str(err).strip() or type(err).__name__).splitlines()[0]
        print(
            f"txcompile: internal error: {type(err).__name__}: {line} (--debug shows the traceback)",
            file=sys.stderr,
        )
        return 3


def entry() -> None:
    """The ``txcompile`` command: :func:`main`, then exit without collecting the heap's
    reference cycles one by one (a model's IR is full of them; that took 0.5–1 s at exit on
    BERT-base). Temporary folders and exit hooks still run; only the cycle collection is left
    to the end of the process."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
