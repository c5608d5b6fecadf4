"""`latentstore steer`: generate text with an SAE feature's decoder direction added (notebook 004)."""

from __future__ import annotations

import argparse

from jobs.settings import finite_float

STEER_HELP = """\
Generate from a prompt with MAGNITUDE * W_dec[FEATURE] added to the SAE's hook at every
position, as notebook 004 steers Gemma with a Gemma Scope feature. Greedy unless --sample.

  latentstore steer --model gpt2-small --sae gpt2-small-res-jb/blocks.8.hook_resid_pre \\
      --feature 1234 --magnitude 40 --prompt "My favourite place is"

With --store and no --model/--sae, the store's model and its SAE --sae-name are used.
"""


def add_commands(subparsers) -> None:
    steer = subparsers.add_parser("steer", help="generate with a feature's decoder direction added",
                                  description=STEER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    steer.add_argument("--prompt", required=True, help="the text to continue")
    steer.add_argument("--feature", type=int, required=True, help="the SAE feature whose decoder row is added")
    steer.add_argument("--magnitude", type=finite_float, required=True, help="how many units of the direction to add")
    steer.add_argument("--model", help="a TransformerLens model name or local model directory")
    steer.add_argument("--sae", help="the SAE (same forms as `latentstore extract --sae`)")
    steer.add_argument("--store", help="take --model and --sae from this store's run")
    steer.add_argument("--sae-name", "--hook", dest="sae_name", metavar="NAME",
                       help="with --store: which of its SAEs, by name, or by hook where one SAE sits there "
                            "(needed when it holds several)")
    steer.add_argument("--max-new-tokens", type=int, default=50, help="(default: %(default)s)")
    steer.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    steer.add_argument("--temperature", type=finite_float, help="with --sample (default: 1.0)")
    steer.add_argument("--seed", type=int, help="with --sample: makes the run repeatable")
    steer.add_argument("--compare", action="store_true", help="also print the unsteered continuation")
    steer.set_defaults(handler=steer_command)


def resolve_model_and_sae(args: argparse.Namespace) -> tuple[str, str]:
    """The --model and --sae texts, from the flags or from the store's record of its run."""
    from store import FeatureStore
    from store.errors import ConfigError

    model, sae = args.model, args.sae
    if args.store and (model is None or sae is None):
        fs = FeatureStore.open(args.store)
        if sae is None:
            from jobs.export import chosen_sae

            sae = fs.sae_record(chosen_sae(fs, args.sae_name, "--sae-name"))["source"]
        model = model or fs.run["model"]["name"]
    if model is None or sae is None:
        raise ConfigError("name the --model and the --sae, or a --store whose run says which.")
    return model, sae


def steer_command(args: argparse.Namespace) -> None:
    from jobs.terminal import terminal_text
    from pipeline.models import load_model
    from pipeline.saes import SAESource, load_sae
    from pipeline.steering import check_generation, steer
    from jobs.settings import refuse_credentials
    from store.errors import ConfigError

    refuse_credentials({"--model": args.model, "--sae": args.sae})  # first: nothing may load or show them
    if args.temperature is not None and not args.sample:  # greedy decoding has none: it would be ignored
        raise ConfigError(f"--temperature {args.temperature} applies to sampling: add --sample, or leave --temperature "
                          "out for greedy decoding.")
    if args.store and args.model is not None and args.sae is not None:
        raise ConfigError("--store only supplies the --model or --sae left out, and both are given: leave --store "
                          "(and --sae-name) out, or one of --model and --sae.")
    check_generation(args.max_new_tokens, args.sample, args.temperature)  # before anything loads
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample, "seed": args.seed}
    if args.temperature is not None:  # else steer's own default
        options["temperature"] = args.temperature
    model_spec, sae_spec = resolve_model_and_sae(args)
    model = load_model(model_spec)
    sae = load_sae(SAESource.parse(sae_spec), dtype=str(model.cfg.dtype).removeprefix("torch."))
    print(terminal_text(steer(model, sae, args.prompt, args.feature, args.magnitude, **options), keep_newlines=True))
    if args.compare:
        print("--- without steering ---")
        print(terminal_text(steer(model, sae, args.prompt, args.feature, 0.0, **options), keep_newlines=True))
