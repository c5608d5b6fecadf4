"""`latentstore top`: a feature's top activations with their context, in the terminal."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from jobs.export import SAE_HELP
from jobs.terminal import terminal_text
from store import FeatureStore
from store.queries import check_examples


def add_commands(commands) -> None:
    parser = commands.add_parser(
        "top", help="print a feature's top activations with their context",
        description="Print the highest activations of SAE features, each with the text around it and the "
                    "active token marked «like this». Without --feature, shows a few features that fire often "
                    "enough to be interesting.",
        epilog="example: latentstore top demo.zarr --sae blocks.1.hook_resid_post --feature 12 -k 10",
    )
    parser.add_argument("store", help="the store's path or URL")
    parser.add_argument("--sae", "--hook", dest="sae", metavar="NAME",
                        help=f"{SAE_HELP} (default: the store's first SAE)")
    parser.add_argument("--feature", type=int, action="append", dest="features",
                        help="a feature index (repeat for several)")
    parser.add_argument("-k", type=int, default=10, help="examples per feature (default: %(default)s)")
    parser.add_argument("--context", type=int, nargs=2, default=(12, 4), metavar=("LEFT", "RIGHT"),
                        help="tokens of context on each side (default: 12 4)")
    parser.add_argument("--include-special-tokens", action="store_true", help="also show BOS/EOS/padding tokens")
    parser.set_defaults(handler=_handle)


def pick_features(fs: FeatureStore, sae: str, n: int = 3, seed: int = 0) -> list[int]:
    """A few features that fire on between 0.1% and 5% of tokens, chosen reproducibly."""
    density = fs.density(sae).to_numpy()
    candidates = np.nonzero((density >= 1e-3) & (density <= 5e-2))[0]
    if len(candidates) < n:
        candidates = np.argsort(-density)[: max(n, 1)]
    return sorted(np.random.default_rng(seed).choice(candidates, size=min(n, len(candidates)), replace=False).tolist())


def _handle(args: argparse.Namespace) -> None:
    from pipeline.tokens import use_tokenizer

    fs = FeatureStore.open(args.store)
    if not fs.complete:  # a look while a run goes is useful, but must not pass for the whole run
        print(f"note: {terminal_text(fs.location)} is still being written (or its extraction stopped part-way): "
              f"these come from its {len(fs.shards)} complete shards, {fs.n_tokens:,} tokens so far.",
              file=sys.stderr)
    record = fs.sae_record(args.sae or fs.saes[0])  # an unknown name, or a hook shared by several SAEs: refused
    sae = record["name"]
    check_examples(args.k, tuple(args.context))  # every argument checked before anything is printed
    features = [fs.check_feature(sae, f) for f in args.features] if args.features else pick_features(fs, sae)
    stats = fs.feature_stats(sae)
    title = sae if sae == record["hook"] else f"{sae} ({record['hook']})"
    use_tokenizer(fs)  # the context column's tokens, shown from the run's tokenizer (store.tokens)
    for feature in features:
        s = stats.loc[feature]
        print(f"\n{terminal_text(title)}  feature {feature}   fires on {s['density']:.3%} of tokens, "
              f"max {s['max']:.3g}")
        top = fs.top_activations(sae, feature, k=args.k, context=tuple(args.context),
                                 exclude_special_tokens=not args.include_special_tokens)
        for _, example in top.iterrows():
            text = terminal_text(example["context"])
            print(f"  {example['activation']:8.3f}  row {example['row']:>6} pos {example['pos']:>5}  {text}")
