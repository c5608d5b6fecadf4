"""`latentstore export`: a store's features in other tools' formats.

``neuronpedia``: SAEDashboard's batch JSON, one ``batch-N.json`` per batch of features, with every
key that Neuronpedia's converter (``convert-saedashboard-to-neuronpedia-export.py`` in its
``utils/neuronpedia-utils``) reads, in SAEDashboard's types (``docs/DASHBOARDS.md`` lists them and
what each holds). Beyond SAEDashboard, every activation example carries ``dataset_row``,
``dataset_pos`` and ``token_index``: where its qualifying token came from.

``delphi``: EleutherAI delphi's latent cache (``jobs/export_delphi.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from jobs.output import output_folder
from jobs.terminal import terminal_text
from pipeline.dashboard_data import (DashboardBuilder, checked_features, collector_paused, DashboardSettings,
                                     FeatureDashboard, load_decoder, load_logit_weights, output_hook, window_starts)
from store import FeatureStore
from store.errors import ConfigError
from store.tokens import TokenDisplay

log = logging.getLogger(__name__)
BATCH_FEATURES = 128  # SAEDashboard's n_features_per_batch in Neuronpedia runs
# SAEDashboard's Neuronpedia runner: a top group of 20, then 5 equal-width intervals of [0, max] with
# 5 examples drawn from each; its feature tables list 3 rows (neuron alignment, correlated features)
NEURONPEDIA_SETTINGS = DashboardSettings(n_top=20, n_groups=5, per_group=5, group_method="interval", n_cofiring=0,
                                         n_correlated=3)
TABLE_ROWS = 3
# the hook points Neuronpedia's converter takes (its --hook-point choices)
CONVERTER_HOOK_POINTS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_in", "hook_mlp_out",
                         "hook_attn_in", "hook_attn_out", "hook_z")
# the option that picks one of a store's SAEs, in every command that reads one
SAE_HELP = "the SAE, by its name (`latentstore info` lists them), or by its hook where it is the only SAE there"
ONLY_SAE = " (default: the store's SAE, where it holds one)"


def chosen_sae(fs: FeatureStore, name: str | None, flag: str = "--sae") -> str:
    """The name of the store's SAE that ``flag`` gives (a name, or a hook where one SAE sits);
    without it, the store's only SAE. Refused before any work, the flag and the SAEs named, when it
    names none or one of several, or is left out of a store of several."""
    if name is None:
        if len(fs.saes) != 1:
            raise ConfigError(f"{fs.location} holds {len(fs.saes)} SAEs ({', '.join(fs.saes)}): choose one with "
                              f"{flag} NAME.")
        return fs.saes[0]
    try:
        return fs.resolve(name)
    except ConfigError as e:  # an unknown name, or a hook that several SAEs read: the message lists them
        raise ConfigError(f"{flag} {name!r}: {e}") from None


def add_commands(commands) -> None:
    export = commands.add_parser("export", help="write a store's features in another tool's format",
                                 description="Write a store's features in another tool's format.")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    parser = formats.add_parser(
        "neuronpedia", help="SAEDashboard's batch-N.json files, as Neuronpedia's converter imports them",
        description="Write SAEDashboard's Neuronpedia JSON (one batch-N.json per batch of features) from the "
                    "store, with every key Neuronpedia's converter reads: top activations and 5 equal-width "
                    "interval groups, histogram, density and correlated features from the stored activations; "
                    "the logit tables, neuron alignment and decoder vector from the SAE's W_dec and the "
                    "model's W_U (loaded, never run). Prints the converter's command line to run next.",
        epilog="example: latentstore export neuronpedia demo.zarr --sae blocks.1.hook_resid_post --out np/ "
               "--model-id gpt2-small --sae-set res-demo",
    )
    parser.add_argument("store", help="the store's path or URL")
    parser.add_argument("--sae", "--hook", dest="sae", metavar="NAME", help=SAE_HELP + ONLY_SAE)
    parser.add_argument("--out", required=True, help="the folder to write batch-N.json files into")
    parser.add_argument("--features", type=feature_range,
                        help="START:STOP (default: every feature); batches are numbered over the whole SAE, so "
                             "pieces whose bounds are multiples of --batch-size can share one folder")
    parser.add_argument("--batch-size", type=int, default=BATCH_FEATURES,
                        help="features per batch file: batch-N.json holds features N*SIZE to (N+1)*SIZE-1 "
                             "(default: %(default)s)")
    parser.add_argument("--model-id", help="Neuronpedia's model id, the TransformerLens name such as gpt2-small "
                                           "(default: the model name recorded in the store; for a local model "
                                           "folder, the folder's name)")
    parser.add_argument("--sae-set", help="Neuronpedia's SAE set, without the layer, such as res-jb (default: the "
                                          "hook's kind, e.g. resid-post for blocks.1.hook_resid_post)")
    parser.add_argument("--sae-id-suffix", help="Neuronpedia's suffix after the set, as in 1-res-jb__SUFFIX, for "
                                                "several SAEs of one set and layer (default: the SAE's name when "
                                                "it was given one, so that two SAEs at one hook get two ids; "
                                                "none for an SAE named by its hook)")
    parser.add_argument("--dataset", help="the dataset named on Neuronpedia, such as monology/pile-uncopyrighted "
                                          "(default: the dataset name recorded in the store)")
    parser.add_argument("--no-logits", dest="logits", action="store_false",
                        help="no weights are loaded: the logit tables, neuron alignment and vector are left empty "
                             "(an SAE that does not write the residual stream, such as one at hook_z, gets no logit "
                             "tables in any case)")
    parser.add_argument("--no-correlated-features", dest="correlated_features", action="store_false",
                        help="leave the correlated_features_* lists empty, as SAEDashboard writes them without its "
                             "feature tables (their products over every pair of features are most of the export's "
                             "time for a wide SAE that fires often)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(handler=_handle)

    from jobs.export_delphi import add_command as add_delphi

    add_delphi(formats)


def feature_range(text: str) -> range:
    """``START:STOP`` as on the command line."""
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:STOP, e.g. 0:4096") from None
    if not 0 <= start < stop:
        raise argparse.ArgumentTypeError(f"{text!r}: START must be at least 0 and less than STOP")
    return range(start, stop)


@dataclass(frozen=True)
class NeuronpediaNames:
    """How Neuronpedia names the exported SAE (the batch header), each defaulted from the store."""

    model_id: str | None = None  # default: the recorded model name (a local folder: its name)
    sae_set: str | None = None  # default: the hook's kind, e.g. resid-post
    sae_id_suffix: str | None = None  # default: the SAE's name when it is not its hook, else none (null)
    dataset: str | None = None  # default: the recorded dataset name


def export_neuronpedia(fs: FeatureStore, sae: str, out: str | Path, features: range | None = None,
                       batch_size: int = BATCH_FEATURES, logits: bool = True,
                       names: NeuronpediaNames = NeuronpediaNames(), progress: bool = False,
                       correlated_features: bool = True) -> list[Path]:
    """Write ``batch-N.json`` files of SAE ``sae`` (its name, or the hook where it is the only SAE) and
    return their paths. Batches are numbered over the whole SAE, as SAEDashboard's runner numbers
    them: ``batch-N`` holds the features from ``N * batch_size`` to
    ``(N + 1) * batch_size - 1`` that ``features`` includes, so that pieces of one SAE exported apart
    (``0:4096``, then ``4096:8192``) never write two batches of one name, into one folder or, through
    Neuronpedia's converter (which names its files after the batch's), into one ``exports/`` folder.
    Tokens are shown by ``fs.token_display`` (``pipeline.tokens.use_tokenizer(fs)`` makes it from the
    run's tokenizer, as the command does). ``correlated_features=False`` leaves those lists empty."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: give at least 1 feature per batch.")
    fs.require_complete(then="export it")  # an export of part of the run would pass for the whole
    record = fs.sae_record(sae)
    features = checked_features(fs, sae, features)
    # a bound inside a batch: this piece's file of that batch holds only part of it
    partial = sorted({end // batch_size for end in (features.start, features.stop)
                      if end % batch_size and end != record["d_sae"]})
    if partial:
        log.warning("--features %d:%d: %s only part of a batch of %d features, and another piece of this SAE "
                    "would write a file of the same name. To export an SAE in pieces, start and stop each at a "
                    "multiple of --batch-size.", features.start, features.stop,
                    " and ".join(f"batch-{n}.json" for n in partial) + (" holds" if len(partial) == 1 else " hold"),
                    batch_size)
    out = output_folder(out, "the Neuronpedia export", make=True)
    header = batch_header(fs, sae, names)
    check_other_batches(out, header)
    W_dec = load_decoder(fs, sae) if logits else None
    weights = None
    if W_dec is not None:
        try:
            weights = load_logit_weights(fs, sae, W_dec=W_dec)
        except ConfigError as e:  # an SAE that does not write the residual stream (hook_z): no logit tables
            log.warning("%s The logit tables are left empty; the decoder's tables and vector are written.", e)
    settings = NEURONPEDIA_SETTINGS if correlated_features else replace(NEURONPEDIA_SETTINGS, n_correlated=0)
    builder = DashboardBuilder(fs, sae, weights, settings, progress=progress)
    common = {"n_prompts_total": n_windows(builder), "n_tokens_in_prompt": int(fs.run["context_size"]),
              "dataset": names.dataset or fs.run["dataset"]["name"]}
    heads = n_heads(fs) if output_hook(record).endswith(".hook_z") else None  # where its decoder writes
    display, n_tokens = fs.token_display, fs.n_tokens
    written: list[Path] = []
    batch: list[dict[str, Any]] = []
    tables: dict[int, dict[str, Any]] = {}
    texts: dict[tuple[int, int], orjson.Fragment] = {}  # each window's tokens shown in the batch, as JSON once
    # a batch's bytes are written on another thread (writing lets go of the GIL) while the next is built
    with ThreadPoolExecutor(1, thread_name_prefix="neuronpedia-write") as writer, collector_paused():
        writing = None  # (the collector is paused: a batch is tens of thousands of small objects, none in a cycle)
        for dashboard in builder.build(features, progress=progress):
            number = dashboard.feature // batch_size  # the batch's place in the whole SAE
            if dashboard.feature not in tables:  # the decoder's tables, for the rest of this batch at once
                ahead = range(dashboard.feature, min(features.stop, (number + 1) * batch_size))
                tables = decoder_tables(None if W_dec is None else W_dec[ahead.start:ahead.stop].numpy(), ahead, heads)
            batch.append(neuronpedia_feature(dashboard, display, n_tokens, tables.pop(dashboard.feature), common, texts))
            if (dashboard.feature + 1) % batch_size == 0 or dashboard.feature == features.stop - 1:
                path = out / f"batch-{number}.json"
                # orjson: ten times json's speed here; float32 arrays written as their shortest exact text
                data = orjson.dumps({**header, "features": batch}, option=orjson.OPT_SERIALIZE_NUMPY)
                if writing is not None:  # the batch before (its error, if any, raised here); one batch waits at most
                    writing.result()
                writing = writer.submit(path.write_bytes, data)
                written.append(path)
                batch, texts = [], {}
        if writing is not None:
            writing.result()
    return written


def hook_point(hook: str) -> str:
    """The hook's name within its block, as the converter's --hook-point takes it: hook_resid_post."""
    return "hook_" + hook.rsplit(".hook_", 1)[-1] if ".hook_" in hook else hook


def hook_layer(hook: str) -> int:
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else 0


def batch_header(fs: FeatureStore, sae: str, names: NeuronpediaNames) -> dict[str, Any]:
    """SAEDashboard's batch fields, but ``features``. Neuronpedia's id of the SAE is
    ``LAYER-SET__SUFFIX``: the layer and the set's default come from the hook the SAE reads, and the
    suffix's from its name, unless the SAE is named by that hook."""
    record = fs.sae_record(sae)
    hook, name = record["hook"], record["name"]
    return {"model_id": names.model_id or Path(fs.run["model"]["name"]).name, "layer": hook_layer(hook),
            "sae_set": names.sae_set or hook_point(hook).removeprefix("hook_").replace("_", "-"),
            "sae_id_suffix": names.sae_id_suffix or (name if name != hook else None)}


def check_other_batches(out: Path, header: dict[str, Any]) -> None:
    """Refuse an ``out`` that holds batch files of another export (another SAE, model or set): the
    converter reads a folder as one SAE, so they would be imported as this one's. Pieces of this
    export (--features ranges) may share it. A batch file begins with these fields (``batch_header``)."""
    for path in sorted(out.glob("batch-*.json")):
        try:
            with path.open("rb") as f:
                head = f.read(1 << 12).split(b',"features":')[0] + b"}"
            found = orjson.loads(head)
            found = {key: found.get(key) for key in header} if isinstance(found, dict) else None
        except (OSError, orjson.JSONDecodeError):
            found = None
        if found != header:
            shown = lambda fields: ", ".join(f"{k} {v!r}" for k, v in fields.items())  # noqa: E731
            said = "not a batch file of this tool" if found is None else shown(found)
            raise ConfigError(f"--out {out} holds {path.name} of another export ({said}; this one is {shown(header)}). "
                              "Neuronpedia's converter reads a folder as one SAE: give each SAE a folder of its own, or "
                              "empty this one.")


def n_windows(builder: DashboardBuilder) -> int:
    """Prompts in SAEDashboard's sense: the context windows the model ran over."""
    return len(window_starts(builder.rows, builder.positions))


def n_heads(fs: FeatureStore) -> int:
    from pipeline.models import load_model_config

    return int(load_model_config(fs.run["model"]["name"]).n_heads)


def decoder_tables(W_dec: np.ndarray | None, features: range, heads: int | None) -> dict[int, dict[str, Any]]:
    """Each feature's SAEDashboard fields that come from its decoder row alone: the 3 residual
    dimensions ("neurons") its unit-norm row points along most (SAEDashboard folds the decoder's
    norms in first) with their share of the row's l1 norm; for an SAE at ``hook_z``, the share of
    the row's norm in each attention head; and the row itself, ``vector``. Empty without weights."""
    if W_dec is None:
        empty = {"neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
                 "decoder_weights_dist": [], "vector": []}
        return {f: dict(empty) for f in features}
    rows = W_dec.astype(np.float64)
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)
    k = min(TABLE_ROWS, unit.shape[1])
    top = np.argsort(-unit, axis=1, kind="stable")[:, :k]  # largest first, ties by lower dimension
    values = np.take_along_axis(unit, top, axis=1)
    l1 = np.abs(values) / np.maximum(np.abs(unit).sum(1, keepdims=True), 1e-300)
    per_head = None
    if heads:
        norms = np.linalg.norm(rows.reshape(len(rows), heads, -1), axis=2)
        per_head = (norms / np.maximum(norms.sum(1, keepdims=True), 1e-300)).tolist()
    vectors = W_dec.astype(np.float32)
    return {f: {"neuron_alignment_indices": top[i].tolist(), "neuron_alignment_values": values[i].tolist(),
                "neuron_alignment_l1": l1[i].tolist(), "decoder_weights_dist": per_head[i] if per_head else [],
                "vector": vectors[i]}
            for i, f in enumerate(features)}


def neuronpedia_feature(d: FeatureDashboard, display: TokenDisplay, n_tokens: int, decoder: dict[str, Any],
                        common: dict[str, Any], texts: dict[tuple[int, int], orjson.Fragment] | None = None) -> dict[str, Any]:
    """One feature in SAEDashboard's fields and order (``NeuronpediaDashboardFeature.to_dict``).

    Activation groups as SAEDashboard's Neuronpedia runner makes them: the top group has
    ``bin_min = bin_contains = -1`` (ints) and ``bin_max`` the maximum; an interval group has its
    bounds and its share of all the store's tokens. Correlated neurons (SAEDashboard's correlations
    of the feature with each dimension of the SAE's input) need the model's dense activations, which
    a store does not keep, and another forward over the store's windows to get them (see
    ``docs/DASHBOARDS.md``): those lists are empty, as SAEDashboard leaves them when it does not
    compute them. A feature that never fires has ``frac_nonzero`` 0 (an int), as
    SAEDashboard writes it."""
    logits, correlated = d.logits, d.correlated
    n_logits = len(logits.top_ids) if logits else 0
    shown = display.text(np.concatenate([logits.top_ids, logits.bottom_ids]).astype(np.int64)) if logits else []
    pos_str, neg_str = shown[:n_logits], shown[n_logits:]
    return {
        "feature_index": d.feature,
        "neuron_alignment_indices": decoder["neuron_alignment_indices"],
        "neuron_alignment_values": decoder["neuron_alignment_values"],
        "neuron_alignment_l1": decoder["neuron_alignment_l1"],
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "correlated_features_indices": correlated.indices if correlated else [],
        "correlated_features_l1": correlated.cosine if correlated else [],
        "correlated_features_pearson": correlated.pearson if correlated else [],
        "neg_str": neg_str,
        "neg_values": logits.bottom_values if logits else [],
        "pos_str": pos_str,
        "pos_values": logits.top_values if logits else [],
        "frac_nonzero": d.frac_nonzero if d.n_fired else 0,
        "freq_hist_data_bar_values": d.hist_centers,
        "freq_hist_data_bar_heights": d.hist_counts,
        "logits_hist_data_bar_heights": logits.hist_counts if logits else [],
        "logits_hist_data_bar_values": logits.hist_centers if logits else [],
        **common,  # n_prompts_total, n_tokens_in_prompt, dataset
        "decoder_weights_dist": decoder["decoder_weights_dist"],
        "activations": activations_json(d, window_texts(d, display, texts), n_tokens),
        "vector": decoder["vector"],
    }


def window_texts(d: FeatureDashboard, display: TokenDisplay,
                 texts: dict[tuple[int, int], orjson.Fragment] | None = None) -> list[orjson.Fragment]:
    """The shown tokens of each of the feature's examples, group after group, as JSON text that
    orjson writes as it stands. ``texts`` keeps that of each span of the store's tokens already
    shown (its first and past token): features show the same windows again and again, and each
    span is looked up and made JSON once. The spans not in it yet are looked up together."""
    texts = {} if texts is None else texts
    examples = [e for group in d.groups for e in group.examples]
    spans = [(e.token_index - e.active, e.token_index - e.active + len(e.token_ids)) for e in examples]
    new = {span: e.token_ids for span, e in zip(spans, examples) if span not in texts}
    if new:
        looked_up, at = display.text(np.concatenate(list(new.values()))), 0
        for first, past in new:
            texts[first, past], at = orjson.Fragment(orjson.dumps(looked_up[at:at + past - first])), at + past - first
    return [texts[span] for span in spans]


def activations_json(d: FeatureDashboard, texts: list[orjson.Fragment], n_tokens: int) -> list[dict[str, Any]]:
    """The feature's examples, group after group, each with its group's ``bin_min``, ``bin_max`` and
    ``bin_contains`` and its tokens from ``texts`` (``window_texts``: one per example)."""
    out, shown = [], iter(texts)
    for group in d.groups:
        if group.kind == "top":
            bin_min, bin_max, bin_contains = -1, d.max, -1
        else:
            (bin_min, bin_max), bin_contains = group.interval, group.n_tokens_within / max(1, n_tokens)
        out += [{"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains, "tokens": next(shown),
                 "values": e.values, "qualifying_token_index": e.active, "dataset_row": e.row, "dataset_pos": e.pos,
                 "token_index": e.token_index} for e in group.examples]
    return out


# the converter's options that only the user can fill in (author, release, where the weights are published)
CONVERTER_USER_OPTIONS = {
    "creator-name": "YOUR_NAME", "release-id": "YOUR_RELEASE_ID", "release-title": "YOUR_RELEASE_TITLE",
    "url": "YOUR_URL", "neuronpedia-source-set-description": "YOUR_SET_DESCRIPTION",
    "hf-weights-repo-id": "YOUR_HF_USER/YOUR_HF_REPO", "hf-weights-path": "PATH/IN/THE/REPO/sae.safetensors",
}


def converter_command(fs: FeatureStore, sae: str, out: str | Path, names: NeuronpediaNames) -> str:
    """The command line of Neuronpedia's converter for this export: every option it asks for, so that
    it runs without prompting. Its values are filled in from the store, but for the author, release
    and weights options (``CONVERTER_USER_OPTIONS``' placeholders, the user's to replace). It ends
    with ``--zero-out-bos-token``, a flag the converter otherwise stops to ask about (it has no
    ``--no-`` form): the flag zeroes the values at tokens shown ``<bos>``, and this export already
    shows 0 at every BOS, EOS and padding token, so it changes nothing."""
    header, provenance = batch_header(fs, sae, names), fs.provenance()
    options = {
        # absolute: the converter runs from its own folder
        "saedashboard-output-dir": os.path.abspath(out), **CONVERTER_USER_OPTIONS, "model-name": header["model_id"],
        "neuronpedia-source-set-id": header["sae_set"], "hook-point": hook_point(fs.sae_record(sae)["hook"]),
        "layer-num": header["layer"], "prompts-huggingface-dataset-path": names.dataset or fs.run["dataset"]["name"],
        "n-prompts-total": len(window_starts(provenance["row"].to_numpy(), provenance["pos"].to_numpy())),
        "n-tokens-in-prompt": int(fs.run["context_size"]),
    }
    return "python convert-saedashboard-to-neuronpedia-export.py " + " ".join(
        f"--{key}={shlex.quote(str(value))}" for key, value in options.items()) + " --zero-out-bos-token"


def _handle(args: argparse.Namespace) -> None:
    from jobs.settings import refuse_credentials
    from pipeline.tokens import use_tokenizer

    # written into every batch file and the converter's command line as given
    given = {"--model-id": args.model_id, "--sae-set": args.sae_set, "--sae-id-suffix": args.sae_id_suffix,
             "--dataset": args.dataset}
    refuse_credentials(given)
    # ids Neuronpedia shows and links to: an empty one would fall back to the default unsaid
    unfit = [f"{flag} {terminal_text(repr(value))}" for flag, value in given.items()
             if value is not None and (not value.strip() or not value.isprintable())]
    if unfit:
        raise ConfigError(f"{', '.join(unfit)}: give a name of printable characters, or leave the flag out for its "
                          "default.")
    output_folder(args.out, "the Neuronpedia export")  # before any work
    fs = FeatureStore.open(args.store)
    sae = chosen_sae(fs, args.sae)
    use_tokenizer(fs)  # tokens as Neuronpedia shows them, from the run's tokenizer (store.tokens)
    names = NeuronpediaNames(args.model_id, args.sae_set, args.sae_id_suffix, args.dataset)
    paths = export_neuronpedia(fs, sae, args.out, args.features, args.batch_size, args.logits, names,
                               args.progress, args.correlated_features)
    print(terminal_text(f"wrote {len(paths)} batch file{'s' if len(paths) != 1 else ''} to {args.out}"))
    print("next, Neuronpedia's converter (utils/neuronpedia-utils/neuronpedia_utils in its repository), with "
          "DEFAULT_CREATOR_ID set and the YOUR_... and PATH/... options replaced by your release's:")
    print("  " + terminal_text(converter_command(fs, sae, args.out, names)))  # it quotes the store's text
    point = hook_point(fs.sae_record(sae)["hook"])
    if point not in CONVERTER_HOOK_POINTS:
        print(f"  (the converter takes --hook-point {', '.join(CONVERTER_HOOK_POINTS)}: {terminal_text(point)} is not "
              "one of them)")
