"""The `latentstore sweep` command line. Kept apart from the Ray driver in ``jobs.sweep`` so that
building the parser (``latentstore --help``) imports neither torch nor sae_lens."""

from __future__ import annotations

import argparse
METRICS = ("logit_diff", "loss", "kl")

SWEEP_HELP = """\
Ablate every live SAE feature at a position of each prompt and record the change in a metric,
exactly as a loop of run_with_hooks_with_saes would, but batched and from the SAE's layer on.
Results go into the store under sweeps/NAME; read them with store.sweeps.read_sweep.

Prompts that are rows of an extraction store (the store says which features are live):

  latentstore sweep --name l1-last --store demo.zarr --rows 0:200 --metric kl

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
    sweep.add_argument("--model", help="default: the store's model")
    sweep.add_argument("--sae", help="default: the store's SAE at --hook")
    sweep.add_argument("--hook", help="which of the store's SAEs (needed when it holds several)")
    sweep.add_argument("--metric", choices=METRICS, default="logit_diff",
                       help="logit_diff: answer minus wrong answer at the last position; loss: of the answer "
                            "(file prompts) or the prompt's mean next-token loss (store rows: only positions after "
                            "the ablated one can change it, so pair it with an early --position or 'all'); kl: from "
                            "the clean model at the last position (default: %(default)s)")
    sweep.add_argument("--position", type=_position, default=-1,
                       help="the position ablated, negative from the end, or 'all' (default: %(default)s)")
    sweep.add_argument("--features", type=_features, help="comma-separated feature ids (default: every live feature)")
    sweep.add_argument("--ablation", type=_ablation, default="zero",
                       help="zero, mean (the store's mean over all tokens) or a scale factor (default: %(default)s)")
    sweep.add_argument("--error-term", dest="use_error_term", action="store_true",
                       help="splice the SAE with its error term (sae_lens's use_error_term)")
    sweep.add_argument("--method", choices=["exact", "attribution"], default="exact")
    sweep.add_argument("--verify-top", type=int, help="with attribution: recompute the N strongest features exactly")
    sweep.add_argument("--prompts-per-part", type=int, default=16)
    sweep.add_argument("--features-per-part", type=int, default=256)
    sweep.add_argument("--batch-size", type=int, default=32, help="prompt copies per forward (default: %(default)s)")
    sweep.add_argument("--workers", type=int)
    sweep.add_argument("--cpus-per-worker", type=float)
    sweep.add_argument("--address", help="a Ray cluster to join (default: $RAY_ADDRESS, else start one here)")
    sweep.add_argument("--overwrite", action="store_true", help="replace a different sweep of the same name")
    sweep.add_argument("--no-progress", dest="progress", action="store_false")
    sweep.set_defaults(handler=sweep_command)


def sweep_command(args: argparse.Namespace) -> None:
    from jobs.sweep import SweepConfig, run_sweep

    fields = {k: v for k, v in vars(args).items() if k in SweepConfig.__dataclass_fields__}
    cfg = SweepConfig(**fields)
    counts = run_sweep(cfg)
    print(f"sweep {cfg.name!r}: {counts['n_lines']:,} (prompt, feature) lines over {counts['n_prompts']} prompts "
          f"and {counts['n_features']} features, in {cfg.store}")
    print(f"read it: store.sweeps.read_sweep({cfg.store!r}, {cfg.name!r})")


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
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give feature ids separated by commas, e.g. 12,408,9031") from None


def _ablation(text: str) -> str | float:
    if text in ("zero", "mean"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use zero, mean or a scale factor such as 0.5") from None

