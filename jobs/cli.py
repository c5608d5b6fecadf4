"""The `latentstore` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys

from jobs.settings import SettingsError, finite_float
from jobs.terminal import show_logs_masked, terminal_text
from store.errors import ConfigError, LatentStoreError, disk_full, is_disk_full

EXTRACT_HELP = """\
Run a TransformerLens model with sae_lens SAEs attached over a dataset, on Ray
workers, and keep every SAE's sparse feature activations in a zarr store.

With no --model, --sae or --dataset, it runs the embedded default (a small model
trained on Python's standard library, with two SAEs) on its bundled corpus:

  latentstore extract --store demo.zarr

On your own model, SAEs and data (hub names need network access):

  latentstore extract --model gpt2-small \\
      --sae gpt2-small-res-jb/blocks.8.hook_resid_pre \\
      --sae gpt2-small-res-jb/blocks.10.hook_resid_pre \\
      --dataset NeelNanda/pile-10k --context-size 128 --max-tokens 5_000_000 \\
      --store s3://bucket/gpt2-res.zarr --workers 8

A Hugging Face model saved with save_pretrained (and its tokenizer beside it)
loads through TransformerBridge; SAEs still name TransformerLens hooks:

  latentstore extract --model ./my-gpt2 --sae ./my-sae --dataset data.jsonl

Several SAEs at one hook, each named (NAME=SOURCE); queries, exports and sweeps
then take the name:

  latentstore extract --model gemma-2-2b --dataset NeelNanda/pile-10k \\
      --sae w16k=gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical \\
      --sae w65k=gemma-scope-2b-pt-res-canonical/layer_12/width_65k/canonical

Every kind of SAE sae_lens loads, one example each:

  standard          --sae gpt2-small-res-jb/blocks.8.hook_resid_pre
  JumpReLU          --sae gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical
  Gemma Scope npz   --sae params.npz@blocks.12.hook_resid_post
  TopK              --sae sae_bench_gemma-2-2b_topk_width-2pow12_date-1109/blocks.12.hook_resid_post__trainer_0
  gated             --sae sae_bench_pythia70m_sweep_gated_ctx128_0730/blocks.3.hook_resid_post__trainer_0
  BatchTopK, Matryoshka (saved as JumpReLU)
                    --sae gemma-2-2b-res-matryoshka-dc/blocks.12.hook_resid_post
  normalising at run time (layer_norm, constant_norm_rescale)
                    --sae mistral-7b-res-wg/blocks.8.hook_resid_pre
  transcoder        --sae gemma-scope-2b-pt-transcoders/layer_0/width_16k/average_l0_76
  skip transcoder   --sae runs/skip-tc   (a directory SkipTranscoder.save_model wrote)

On a cluster, the same command under Ray's job API:

  ray job submit --working-dir . -- latentstore extract ...

Rerunning the same command resumes: complete shards are kept, the rest is done.
"""

DEFAULT_STORE = "latentstore.zarr"

SAE_HELP = """\
an SAE, as [NAME=]SOURCE; repeat the flag for more, any number per hook. NAME keys the SAE's data
in the store (default: the hook it reads); two SAEs at one hook need names, e.g.
--sae res_16k=DIR16 --sae res_65k=DIR65. SOURCE is one of:
RELEASE/SAE_ID (sae_lens pretrained, e.g. gpt2-small-res-jb/blocks.8.hook_resid_pre);
a directory in sae_lens's disk format (cfg.json + sae_weights.safetensors);
PATH/params.npz@HOOK (a Gemma Scope JumpReLU SAE and the hook it reads).
Every sae_lens architecture loads: standard, JumpReLU, TopK, gated, BatchTopK and Matryoshka
(saved as JumpReLU), SAEs that normalise at run time, and transcoders and skip transcoders
(latents from their input hook; the store records their output hook)"""


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors quote the arguments given ("invalid choice: 's3://KEY:SECRET@...'"):
    every URL in them is shown with its credentials masked. Subcommands' parsers are of this class too."""

    def error(self, message: str):
        from store.location import mask_urls

        # argparse takes a value such as -1:4 for an option, and says only that the flag has none
        if flag := re.fullmatch(r"argument (?:\S+/)?(--[\w-]+): expected one argument", message):
            message += f" (a value that starts with '-' goes after '=', as in {flag[1]}=VALUE)"
        # one message, as every other error is, rather than argparse's usage block above it
        self.exit(2, f"{self.prog}: error: {terminal_text(mask_urls(message), keep_newlines=True)}\n"
                     f"(`{self.prog} --help` lists the options.)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="latentstore",
        description="Sparse SAE feature activations over a whole dataset: extract once, query many times.",
        epilog="Run `latentstore COMMAND --help` for each command's options and examples.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    extract = commands.add_parser(
        "extract", help="extract SAE activations over a dataset into a store",
        description=EXTRACT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The defaults are the specs' own (pipeline.specs: numpy, no torch, so that --help stays quick).
    from jobs.settings import default_of
    from pipeline.specs import ExtractConfig
    from store.format import VALUE_DTYPES

    what = extract.add_argument_group("what to run")
    what.add_argument("--model", help="a TransformerLens model name, or a local model directory of config.json + "
                      "model.safetensors: latentstore's (pipeline.models.save_model), loaded as a "
                      "HookedTransformer, or a Hugging Face one (model.save_pretrained(dir) and "
                      "tokenizer.save_pretrained(dir); its config.json names a model_type), loaded through "
                      "TransformerBridge with Hugging Face's numerics. Default, when --sae and --dataset are left out too: the "
                      "embedded default model")
    what.add_argument("--sae", action="append", dest="saes", metavar="SAE", help=SAE_HELP)
    what.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"],
                      help="run the model and SAEs in this dtype (default: the model's own)")
    data = extract.add_argument_group("the dataset")
    data.add_argument("--dataset", help="a hub dataset name, a local .jsonl/.json/.parquet/.csv/.txt file, "
                      "or a folder written by Dataset.save_to_disk. Default, when --model and --sae are left out too: the "
                      "embedded corpus")
    data.add_argument("--split", default=default_of(ExtractConfig, "split"),
                      help="the split to read (default: %(default)s)")
    data.add_argument("--subset", help="the hub dataset's configuration, where it has several")
    data.add_argument("--text-column", default=default_of(ExtractConfig, "text_column"),
                      help="the column holding text (default: %(default)s)")
    data.add_argument("--tokens-column", help="a column of pre-tokenized rows, used exactly as given (no BOS added)")
    data.add_argument("--context-size", type=_int, default=default_of(ExtractConfig, "context_size"),
                      help="tokens per window; longer rows are split into several windows (default: %(default)s)")
    data.add_argument("--max-tokens", type=_int, help="stop after exactly this many tokens (default: the whole dataset)")
    bos = data.add_mutually_exclusive_group()
    bos.add_argument("--prepend-bos", dest="prepend_bos", action="store_true", default=None,
                     help="start every window with BOS (default: as the SAEs were trained)")
    bos.add_argument("--no-prepend-bos", dest="prepend_bos", action="store_false")
    out = extract.add_argument_group("the store")
    out.add_argument("--store", default=DEFAULT_STORE,
                     help="a local path or an fsspec URL such as s3://bucket/run.zarr (default: %(default)s)")
    out.add_argument("--value-dtype", choices=VALUE_DTYPES, default=default_of(ExtractConfig, "value_dtype"),
                     help="precision of stored activations (default: %(default)s)")
    out.add_argument("--top-k", type=_int, default=default_of(ExtractConfig, "top_k"),
                     help="top activations kept per feature in the store's statistics (default: %(default)s)")
    out.add_argument("--no-index", dest="index", action="store_false",
                     help="skip the feature-major index at the end (build it later with `latentstore index`)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace a store that holds a different run (default: refuse)")
    run = extract.add_argument_group("resources")
    run.add_argument("--workers", type=_int, help="Ray workers: one per GPU by default, 1 on a CPU-only cluster")
    device = run.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="use_gpu", action="store_true", default=None,
                        help="one GPU per worker, even if the cluster has none yet (it scales up; give --workers)")
    device.add_argument("--cpu", dest="use_gpu", action="store_false",
                        help="CPU workers, even on a cluster with GPUs (default: GPUs if the cluster has them)")
    run.add_argument("--cpus-per-worker", type=finite_float, help="CPU cores per CPU worker (default: share them all)")
    run.add_argument("--batch-size", type=_int, default=default_of(ExtractConfig, "batch_size"),
                     help="windows per forward pass (default: %(default)s)")
    run.add_argument("--shard-tokens", type=_int, default=default_of(ExtractConfig, "shard_tokens"),
                     help="tokens per shard, the unit of work, of memory and of resuming; whole windows, so a long "
                          "row spans several shards (default: %(default)s)")
    run.add_argument("--address", help="a Ray cluster to join (default: $RAY_ADDRESS, else start one here)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    info = commands.add_parser("info", help="print a summary of a store",
                               description="Print what a store holds: model, SAEs, dataset, counts.")
    info.add_argument("store", help="the store's path or URL")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.add_argument("--tree", action="store_true", help="also list every group and array (see docs/FORMAT.md)")

    from jobs import dashboard, export, index, steer, sweep_cli, top, verify

    index.add_commands(commands)
    export.add_commands(commands)
    dashboard.add_commands(commands)
    top.add_commands(commands)
    sweep_cli.add_commands(commands)
    steer.add_commands(commands)
    verify.add_commands(commands)
    return parser


def _int(text: str) -> int:
    """Integers as people write them: 5_000_000, 5000000, 5e6."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        return int(value)


def extract_config(args: argparse.Namespace):
    """The config of ``latentstore extract``'s arguments: the embedded default when none of
    --model, --sae and --dataset is given."""
    from jobs.extract import ExtractConfig
    from pipeline.dataset import DatasetSpec

    model, saes, dataset = args.model, tuple(args.saes or ()), args.dataset
    if model is None or not saes or dataset is None:
        from pipeline import default

        embedded = {"--model": str(default.MODEL_DIR), "--sae": tuple(str(p) for p in default.default_sae_dirs()),
                    "--dataset": str(default.TRAIN_CORPUS)}
        if model is None and not saes and dataset is None:
            model, saes, dataset = embedded.values()
        else:
            missing = [flag for flag, value in [("--model", model), ("--sae", saes), ("--dataset", dataset)]
                       if not value]
            shown = " ".join(f"{flag} {shlex.quote(path)}" for flag in missing
                             for path in ((embedded[flag],) if isinstance(embedded[flag], str) else embedded[flag]))
            raise ConfigError(f"give {', '.join(missing)} as well, or none of --model/--sae/--dataset to run the "
                              f"embedded default. The embedded default's are: {shown}")
    settings = {k: v for k, v in vars(args).items() if k in ExtractConfig.settings()}
    return ExtractConfig.build(**{**settings, "model": model, "saes": saes, "dataset": DatasetSpec(dataset)})


def format_info(info: dict) -> str:
    """``info``'s summary, its text from the store escaped value by value (a newline in a name cannot
    start a line of its own)."""
    t = lambda value: terminal_text(str(value))  # noqa: E731
    lines = [
        f"store        {t(info['location'])}  ({t(info['status'])}, format {t(info['format_version'])})",
        f"model        {t(info['model'])}",
        f"dataset      {t(info['dataset'])}" + (f"  split {t(info['split'])}" if info.get("split") else ""),
        f"windows      {info['context_size']} tokens, BOS {'on' if info['prepend_bos'] else 'off'}, "
        f"values {t(info['value_dtype'])}",
        f"tokens       {info['n_tokens']:,} in {info['n_shards']} shards",
        "saes",
    ]
    for sae in info["saes"]:
        lines.append(
            f"  {t(sae['name']):<32} {t(sae['architecture']):<9} d_sae {sae['d_sae']:<7} "
            f"nonzeros {sae['nnz']:,} (mean L0 {sae['mean_l0']:.1f})"
        )
        lines.append(f"    hook {t(sae['hook'])}\n    from {t(sae['source'])}")
    return "\n".join(lines)


def _store_locations(args: argparse.Namespace) -> list[str]:
    """The store paths or URLs a command was given."""
    return [args.store] if isinstance(getattr(args, "store", None), str) else []


RESUMABLE = ("extract", "index", "sweep")  # the commands that write a store, which a rerun finishes


def _known_error(error: Exception, store: str | None) -> LatentStoreError | None:
    """The error to report without a traceback, or None for a bug. Besides latentstore's own: a full
    disk met by this process, or by a Ray task whose error was not converted (``ray.get``'s
    RayTaskError(OSError) carries it as its cause; a worker's arrives as a StoreFullError already),
    and whatever could not be reached (no connection, no credentials, access denied): the store's own
    reads say which store; elsewhere the error's own text names what (a dataset file, a hub, a bucket)."""
    if isinstance(error, SettingsError):  # its problems name the config's fields: say the flags instead
        return error.for_command_line()
    full = next((x for x in (error, getattr(error, "cause", None)) if is_disk_full(x)), None)
    if full is not None:
        return disk_full(full, store)
    if isinstance(error, LatentStoreError):
        return error
    from store.location import access_error

    return access_error(None, error)


def _stop_ray() -> None:
    """Leave the Ray that this command started or joined, if it did (without importing Ray)."""
    session = sys.modules.get("jobs.ray_session")
    try:
        if session is not None:
            session.disconnect()
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for it
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # `latentstore` alone: what it can do
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "format", None))))  # "export delphi"
    show_logs_masked(logging.INFO if args.verbose else logging.WARNING)
    try:
        from store.location import normalize

        for location in _store_locations(args):
            normalize(location)  # refuses credentials in a URL before anything reads, logs or prints it
        if args.command == "extract":
            from jobs.extract import run_extract

            cfg = extract_config(args)
            counts = run_extract(cfg)
            print(terminal_text(f"wrote {counts['n_tokens']:,} tokens in {counts['n_shards']} shards to {cfg.store.path}"))
            print(terminal_text(f"next: latentstore info {shlex.quote(cfg.store.path)}"))
        elif args.command == "info":
            from store import FeatureStore

            fs = FeatureStore.open(args.store)
            print(json.dumps(fs.info(), indent=2) if args.json else format_info(fs.info()))
            if args.tree:
                print(terminal_text(fs.tree(), keep_newlines=True))
        else:  # commands registered by add_commands carry their handler, which may return an exit status
            status = args.handler(args)
            if isinstance(status, int) and status:
                return status
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; the writing commands resume on a rerun
        _stop_ray()  # else the workers' own reports of the interrupt follow, as if the run went on
        resumes = " Rerun the same command to resume it: what is complete is kept." if args.command in RESUMABLE else ""
        print(f"latentstore {command}: interrupted.{resumes}", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    except BrokenPipeError:
        # whatever read the output stopped early (`latentstore top STORE | head`): end quietly, as other
        # command-line tools do; stdout goes to devnull so that the flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        shown = _known_error(e, next(iter(_store_locations(args)), None))
        if shown is None:
            raise
        from store.location import mask_urls

        # masked: a message may quote a URL the user typed (a dataset's, a model's), credentials and all
        print(f"latentstore {command}: error: {terminal_text(mask_urls(str(shown)), keep_newlines=True)}",
              file=sys.stderr)
        for note in getattr(shown, "__notes__", []):
            print(f"  {terminal_text(mask_urls(note), keep_newlines=True)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
