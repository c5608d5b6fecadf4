"""The `latentstore sweep` command line. Kept apart from the Ray driver in ``jobs.sweep`` so that
building the parser (``latentstore --help``) imports neither torch nor sae_lens. The defaults are
the specs' own (``pipeline.specs``)."""

from __future__ import annotations

import argparse

from jobs.settings import default_of, finite_float
from pipeline.metric_names import METRICS
from pipeline.specs import SweepConfig

SWEEP_HELP = """\
Ablate every live SAE feature at a position of each prompt and record the change in a metric,
exactly as a loop of run_with_hooks_with_saes would, but batched and from the SAE's layer on.
Results go into the store under sweeps/NAME; read them with store.sweeps.read_sweep.

Prompts that are rows of an extraction store (the store says which features are live; name
its SAE with --sae-name when it holds several):

  latentstore sweep --name first --store demo.zarr --rows 1:2 --metric kl --sae-name blocks.1.hook_resid_post

Prompts from a file, one JSON object a line with prompt, answer and wrong_answer:

  latentstore sweep --name toxic --store sweeps.zarr --prompts prompts.jsonl \\
      --model gpt2-small --sae gpt2-small-res-jb/blocks.8.hook_resid_pre

Rerunning the same command resumes; --method attribution --verify-top 20 ranks all
features with one backward pass and recomputes the top 20 exactly.
"""


def add_commands(subparsers) -> None:
    sweep = subparsers.add_parser("sweep", help="ablate each live feature and record the metric's change",
                                  description=SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("--name", required=True, help="the sweep's name within the store")
    sweep.add_argument("--store", required=True, help="the store to read rows from and write results to")
    source = sweep.add_mutually_exclusive_group(required=True)
    source.add_argument("--rows", type=_rows, help="dataset rows START:STOP of --store as prompts")
    source.add_argument("--prompts", help="a jsonl file: prompt, answer, wrong_answer per line")
    sweep.add_argument("--model", help="default: the store's model (with --prompts, name it)")
    sweep.add_argument("--sae", help="the SAE to ablate, [NAME=]SOURCE as `latentstore extract --sae` takes it "
                                      "(default: the store's SAE --sae-name; with --prompts, name it)")
    sweep.add_argument("--sae-name", "--hook", dest="sae_name", metavar="NAME",
                       help="which of the store's SAEs, by name, or by hook where one SAE sits there "
                            "(needed when the store holds several)")
    sweep.add_argument("--metric", choices=METRICS, default=argparse.SUPPRESS,
                       help="logit_diff: answer minus wrong answer at the last position; loss: of the answer "
                            "(file prompts) or the prompt's mean next-token loss (store rows: only positions after "
                            "the ablated one can change it, so pair it with an early --position or 'all'); kl: from "
                            f"the clean model at the last position (default: {default_of(SweepConfig, 'metric')})")
    sweep.add_argument("--position", type=_position, default=argparse.SUPPRESS,
                       help="the position ablated, negative from the end, or 'all' "
                            f"(default: {default_of(SweepConfig, 'position')})")
    sweep.add_argument("--features", type=_features, default=argparse.SUPPRESS,
                       help="comma-separated feature ids (default: every live feature)")
    sweep.add_argument("--ablation", type=_ablation, default=argparse.SUPPRESS,
                       help="zero, mean (the store's mean over all tokens) or a scale factor "
                            f"(default: {default_of(SweepConfig, 'ablation')})")
    sweep.add_argument("--error-term", dest="use_error_term", action="store_true", default=argparse.SUPPRESS,
                       help="splice the SAE with its error term (sae_lens's use_error_term)")
    sweep.add_argument("--method", choices=["exact", "attribution"], default=argparse.SUPPRESS,
                       help=f"(default: {default_of(SweepConfig, 'method')})")
    sweep.add_argument("--verify-top", type=int, default=argparse.SUPPRESS,
                       help="with attribution: recompute the N strongest features exactly")
    sweep.add_argument("--prompts-per-part", type=int, default=argparse.SUPPRESS,
                       help=f"(default: {default_of(SweepConfig, 'prompts_per_part')})")
    sweep.add_argument("--features-per-part", type=int, default=argparse.SUPPRESS,
                       help=f"(default: {default_of(SweepConfig, 'features_per_part')})")
    sweep.add_argument("--batch-size", type=int, default=argparse.SUPPRESS,
                       help=f"prompt copies per forward (default: {default_of(SweepConfig, 'batch_size')})")
    sweep.add_argument("--workers", type=int, default=argparse.SUPPRESS)
    device = sweep.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="use_gpu", action="store_true", default=argparse.SUPPRESS,
                        help="one GPU per worker, even if the cluster has none yet (it scales up; give --workers)")
    device.add_argument("--cpu", dest="use_gpu", action="store_false", default=argparse.SUPPRESS,
                        help="CPU workers, even on a cluster with GPUs (default: GPUs if the cluster has them)")
    sweep.add_argument("--cpus-per-worker", type=finite_float, default=argparse.SUPPRESS)
    sweep.add_argument("--address", default=argparse.SUPPRESS,
                       help="a Ray cluster to join (default: $RAY_ADDRESS, else start one here)")
    sweep.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                       help="replace a different sweep of the same name")
    sweep.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS)
    sweep.set_defaults(handler=sweep_command)


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    """The config of the settings given on the command line; every other one keeps its spec's default."""
    names = SweepConfig.settings()
    return SweepConfig.build(**{k: v for k, v in vars(args).items() if k in names})


def sweep_command(args: argparse.Namespace) -> None:
    from jobs.sweep import run_sweep

    cfg = sweep_config(args)
    counts = run_sweep(cfg)
    store = cfg.store.path
    print(f"sweep {cfg.name!r}: {counts['n_lines']:,} (prompt, feature) lines over {counts['n_prompts']} prompts "
          f"and {counts['n_features']} features, in {store}")
    print(f"read it: store.sweeps.read_sweep({store!r}, {cfg.name!r})")


def _rows(text: str) -> tuple[int, int]:
    start, colon, stop = text.partition(":")
    try:
        return int(start or 0), int(stop)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write rows as START:STOP, e.g. 0:100") from None


def _position(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a position such as -1, or 'all'") from None


def _features(text: str) -> tuple[int, ...]:
    try:  # every item a number: "1,,2" or "" is a typo to show, not a list to guess at
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give feature ids separated by commas, e.g. 12,408,9031 (or leave "
                                         "--features out for every live feature)") from None


def _ablation(text: str) -> str | float:
    if text in ("zero", "mean"):
        return text
    try:
        return finite_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: use zero, mean or a finite scale factor such as 0.5") from None

