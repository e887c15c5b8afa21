"""``nexedge`` command line: one subcommand per stage.

Each subcommand lives in a light module that defines ``configure_<name>(parser)``
and ``run_<name>(args) -> int``; heavy imports (torch, onnx) happen inside
``run_*`` so ``nexedge --help`` stays fast and works without the extras.
"""

import argparse
import importlib
import logging
import sys
from typing import List, Optional, Sequence, Tuple

from nexedge import __version__, cliopts, threads

# (name, module, one-line help). Order is the order of the data flow.
COMMANDS: List[Tuple[str, str, str]] = [
    ("synth", "nexedge.data.cli", "render a synthetic Nexperia-like data set"),
    ("split", "nexedge.data.cli", "split a folder of class sub-folders into train/val/test"),
    ("train", "nexedge.train.cli", "train a classifier; writes checkpoints with ModelCards"),
    ("eval", "nexedge.train.cli", "report-style table (AUC, FPR at TPR) over checkpoints and crop styles"),
    ("mislabels", "nexedge.train.cli", "rank training images whose label the model disputes"),
    ("explain", "nexedge.explain", "occlusion maps: which region of an image drives a model's defect score"),
    ("export", "nexedge.export.cli", "checkpoint -> ONNX (host or in-graph crops) with parity check"),
    ("calibrate", "nexedge.export.cli", "INT8 calibration: Q/DQ ONNX for TensorRT and ONNX Runtime, TRT cache"),
    ("build-engine", "nexedge.export.cli", "ONNX -> TensorRT engine (FP16/INT8) for this GPU"),
    ("check-onnx", "nexedge.export.cli", "static TensorRT 8.5/8.6/10 compatibility check of an ONNX graph"),
    ("thresholds", "nexedge.export.cli", "measure an artifact's operating points through its own backend"),
    ("doctor", "nexedge.doctor", "check this machine (a Jetson above all) before the daemon's first start"),
    ("camera-sim", "nexedge.serve.cli", "stream a folder of images to the daemon from N simulated cameras"),
    ("line", "nexedge.serve.cli", "a running daemon's models: status, load, promote, rollback, unload, report"),
    ("pull", "nexedge.relabel.cli", "pull uncertain samples from a store or a running daemon"),
    ("store", "nexedge.store.cli", "check a sample store's integrity or print its stats (read-only)"),
    ("import-labels", "nexedge.relabel.cli", "add labelled images (Label Studio JSON or CSV) to a data set"),
    ("keys", "nexedge.relabel.cli", "make CurveZMQ key pairs for daemon authentication"),
    ("bench", "nexedge.bench.cli", "latency/throughput benchmark of a model on a backend"),
    ("demo", "nexedge.demo.cli", "the whole product end to end on synthetic data (CPU, minutes)"),
]


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default unless its help already states one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings or action.default == []):
            return text
        return text + " (default: %(default)s)"


def _fn_name(cmd: str) -> str:
    return cmd.replace("-", "_")


class NexedgeParser(argparse.ArgumentParser):
    """The ``nexedge`` parser: before parsing, global options given after the command move in front of
    it and retired spellings become their new ones (:func:`nexedge.cliopts.rewrite_retired`)."""

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Optional[argparse.Namespace] = None
                         ) -> Tuple[argparse.Namespace, List[str]]:
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(cliopts.rewrite_retired(argv), namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = NexedgeParser(
        prog="nexedge",
        description="Train, export and serve semiconductor defect classifiers on inspection lines.",
    )
    parser.add_argument("--version", action="version", version="nexedge " + __version__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    cliopts.add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=argparse.ArgumentParser)
    for name, module, help_ in COMMANDS:
        try:
            mod = importlib.import_module(module)
            configure = getattr(mod, "configure_" + _fn_name(name))
        except (ImportError, AttributeError):
            continue  # stage not installed in this build
        p = sub.add_parser(name, help=help_, description=help_[:1].upper() + help_[1:] + ".",
                           formatter_class=HelpFormatter)
        configure(p)
        p.set_defaults(_module=module, _name=name)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    threads.quiet_openmp()  # before anything loads torch's OpenMP runtime (torchrun's workers come here too)
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if args.verbose < 2:
        from nexedge.preprocess import quiet_opencv

        quiet_opencv()
    unused = cliopts.check_globals(args)
    if unused:
        parser.error(unused)
    mod = importlib.import_module(args._module)
    run = getattr(mod, "run_" + _fn_name(args._name))
    try:
        if "--threads" not in getattr(args, "_globals", ()):
            return int(run(args) or 0)
        args._threads_given = args.threads is not None
        with threads.applied(args.threads, torch=getattr(args, "_threads_torch", False)) as args.threads:
            return int(run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Library errors name the bad value; show them without a traceback unless -vv.
        if args.verbose >= 2:
            raise
        print(f"nexedge {args._name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
