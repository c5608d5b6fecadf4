"""`latentstore dashboard`: a static site of feature and prompt pages, made from a store.

The site works offline and from ``file://``: its pages, script and style are copied from
``jobs/dashboard_site/``, and its data are small JavaScript files that hand one object to the
page (``LS.receive(key, data)``), loaded on demand by adding a ``<script>`` element, since
browsers refuse ``fetch`` on ``file://``. Each feature and each dataset row is its own file,
so a page reads one small file whatever the SAE's width. The pages only ever put token text
into the document as text (``textContent``), never as HTML.

Layout of ``--out``::

    index.html  feature.html  prompt.html  site.css  site.js
    server.js                         says "no model here" (``--serve`` answers it with what is loaded)
    data/meta.js                      the run, the SAE (its name and hook), the busiest features, the rows
    data/features/<f // 1000>/<f>.js  one feature's dashboard
    data/rows/<r // 1000>/<r>.js      one dataset row's tokens and top features at each
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jobs.export import ONLY_SAE, SAE_HELP, chosen_sae, feature_range
from jobs.output import output_folder
from jobs.terminal import terminal_text
from pipeline.dashboard_data import DashboardBuilder, DashboardSettings, FeatureDashboard, checked_features, load_logit_weights
from store import FeatureStore
from store.errors import ConfigError
from store.tokens import TokenDisplay

SITE = Path(__file__).parent / "dashboard_site"
PAGES = ("index.html", "feature.html", "prompt.html", "site.css", "site.js", "server.js")
FILES_PER_FOLDER = 1000  # keeps folders small for an SAE of 131,072 features
SETTINGS = DashboardSettings(group_method="rank", context=(24, 8))  # true quantiles; text around the token
BUSIEST = 200  # features listed on the front page
SERVE_EPILOG = """\
examples:
  latentstore dashboard demo.zarr --sae blocks.1.hook_resid_post --out site/
      then open site/index.html: no server and no network needed

  latentstore dashboard demo.zarr --sae blocks.1.hook_resid_post --out site/ --serve
      writes the same site, loads the model and SAE recorded in the store, and serves the site
      at http://127.0.0.1:8000; its prompt page (prompt.html) then also shows the top features
      at each token of text you type, computed as the extraction computes them. Prompts may be
      as long as one of the run's windows (--context-size, less one for BOS). Programs can POST
      {"text": "..."} to /api/prompt; GET /api/info says what is loaded.
"""


def add_commands(commands) -> None:
    parser = commands.add_parser(
        "dashboard", help="write a static site of feature and prompt pages",
        description="Write a static site (no server, no network needed to view it: open index.html) with a page "
                    "per feature (top examples, quantile groups, histogram, density, logit table, co-firing "
                    "features, each example's dataset row and position) and a page per dataset row (the top "
                    "features at each token).",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("store", help="the store's path or URL")
    parser.add_argument("--sae", "--hook", dest="sae", metavar="NAME", help=SAE_HELP + ONLY_SAE)
    parser.add_argument("--out", required=True, help="the folder to write the site into")
    parser.add_argument("--features", type=feature_range, help="START:STOP (default: every feature)")
    parser.add_argument("--max-rows", type=int, default=500,
                        help="dataset rows given a prompt page, the first ones in the store (default: %(default)s)")
    parser.add_argument("--no-logits", dest="logits", action="store_false",
                        help="no logit tables (no weights are loaded)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    serving = parser.add_argument_group("typing prompts (needs the run's model)")
    serving.add_argument("--serve", action="store_true",
                         help="after writing the site, load the run's model and SAE and serve the site over HTTP, "
                              "so that the prompt page also takes typed text (Ctrl-C stops)")
    serving.add_argument("--port", type=port_number, help="the port to serve on (default: 8000; 0: any free port)")
    serving.add_argument("--host", help="the address to listen on (default: 127.0.0.1, this machine only)")
    parser.set_defaults(handler=_handle)


def write_dashboard(fs: FeatureStore, sae: str, out: str | Path, features: range | None = None,
                    max_rows: int = 500, logits: bool = True, progress: bool = False) -> Path:
    """Write the site of SAE ``sae`` (its name, or the hook where it is the only SAE) into ``out`` and
    return the path of its ``index.html``."""
    fs.require_complete(then="build its dashboard")  # a site of part of the run would pass for the whole
    sae = fs.resolve(sae)
    features = checked_features(fs, sae, features)
    out = check_site_folder(out, make=True)
    for name in sorted(PAGES, key=lambda n: n != "server.js"):  # server.js first: it marks the folder as a site
        shutil.copyfile(SITE / name, out / name)
    weights = load_logit_weights(fs, sae) if logits else None
    display, record = fs.token_display, fs.sae_record(sae)
    summary = []  # (feature, density, max) as each feature page shows them, for the front page
    for d in DashboardBuilder(fs, sae, weights, SETTINGS).build(features, progress=progress):
        write_data(out, "features", d.feature, feature_json(d, record, display))
        summary.append((d.feature, d.frac_nonzero, d.max))
    token_rows = fs.provenance()["row"].to_numpy()
    rows = np.unique(token_rows)[:max_rows].tolist()
    for row in tqdm(rows, desc="prompt pages", unit="row", disable=not progress):
        lo, hi = np.searchsorted(token_rows, [row, row + 1])
        write_data(out, "rows", row, row_json(fs, sae, row, range(int(lo), int(hi)), display))
    write_script(out / "data" / "meta.js", "meta", meta_json(fs, sae, features, rows, summary))
    return out / "index.html"


def port_number(text: str) -> int:
    """``--port``: a TCP port, 0 to 65535 (0: any free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number, 0 to 65535") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number: give 0 to 65535 (0: any free port)")
    return port


def check_site_folder(out: str | Path, make: bool = False) -> Path:
    """``out`` as a Path (``output_folder``, made if new with ``make``), if the site may be written there:
    a new or empty folder, or one that holds an earlier latentstore dashboard (recognised by its
    ``server.js`` or its ``data/meta.js``). Anything else would have files of the user's overwritten: a
    ConfigError."""
    out = output_folder(out, "the site", make=make)
    if out.is_dir() and any(out.iterdir()) and not _is_site(out):
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
        raise ConfigError(f"--out {out} holds files that are not a latentstore dashboard ({shown}); writing the "
                          "site there would overwrite them. Give a new or empty folder, or the folder of an "
                          "earlier dashboard.")
    return out


def _is_site(folder: Path) -> bool:
    """Whether ``folder`` holds a dashboard written by latentstore, complete or interrupted."""
    try:
        if (folder / "server.js").read_bytes() == (SITE / "server.js").read_bytes():
            return True
    except OSError:
        pass
    try:
        with open(folder / "data" / "meta.js", "rb") as f:
            return f.read(32).startswith(b'LS.receive("meta",')
    except OSError:
        return False


def write_data(out: Path, kind: str, number: int, data: dict[str, Any]) -> None:
    folder = out / "data" / kind / str(number // FILES_PER_FOLDER)
    folder.mkdir(parents=True, exist_ok=True)
    write_script(folder / f"{number}.js", f"{kind}/{number}", data)


def write_script(path: Path, key: str, data: dict[str, Any]) -> None:
    """A script that hands ``data`` to the page. JSON is valid JavaScript; ``<`` is escaped as well
    so that no token text can close a script element, wherever the file ends up included."""
    text = json.dumps(data, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    path.write_text(f"LS.receive({json.dumps(key)},{text});\n", encoding="utf-8")


def feature_json(d: FeatureDashboard, record: dict, display: TokenDisplay) -> dict[str, Any]:
    """One feature's page data; ``record`` is its SAE's run-record entry (``FeatureStore.sae_record``)."""
    logits = None
    if d.logits is not None:
        t = d.logits
        logits = {"pos": [display.text(t.top_ids), t.top_values],
                  "neg": [display.text(t.bottom_ids), t.bottom_values],
                  "hist": [t.hist_centers, t.hist_counts]}
    return {
        "feature": d.feature, "sae": record["name"], "hook": record["hook"], "n_fired": d.n_fired,
        "frac_nonzero": d.frac_nonzero, "max": d.max,
        "hist": [d.hist_centers, d.hist_counts], "logits": logits, "cofiring": d.cofiring,
        "groups": [{"kind": g.kind, "bin_min": g.bin_min, "bin_max": g.bin_max, "bin_contains": g.bin_contains,
                    "examples": [{"token_index": e.token_index, "row": e.row, "pos": e.pos,
                                  "activation": e.activation, "active": e.active,
                                  "tokens": display.text(e.token_ids), "values": e.values.tolist()}
                                 for e in g.examples]}
                   for g in d.groups],
    }


def row_json(fs: FeatureStore, sae: str, row: int, span: range, display: TokenDisplay,
             k: int = 5) -> dict[str, Any]:
    """A dataset row's tokens (store tokens ``span``), and the k strongest features of SAE ``sae`` at each."""
    top = fs.prompt_features(row, sae, k=k)
    tokens = fs.token_ids(span.start, span.stop).tolist()
    features: list[list[list[float]]] = [[] for _ in tokens]
    for token_index, feature, activation in zip(top["token_index"], top["feature"], top["activation"]):
        features[int(token_index) - span.start].append([int(feature), float(activation)])
    return {"row": row, "token_start": span.start, "tokens": display.text(tokens),
            "pos": fs.provenance(span.start, span.stop)["pos"].tolist(), "features": features}


def meta_json(fs: FeatureStore, sae: str, features: range, rows: list[int],
              summary: list[tuple[int, float, float]]) -> dict[str, Any]:
    """The front page's data; ``summary`` holds each built feature's (feature, density, max)."""
    busiest = sorted(summary, key=lambda s: -s[1])[:BUSIEST]  # stable: ties keep the lower feature
    return {
        "sae": fs.resolve(sae), "hook": fs.sae_record(sae)["hook"], "model": fs.run["model"]["name"],
        "dataset": fs.run["dataset"]["name"], "n_tokens": fs.n_tokens, "d_sae": fs.d_sae(sae),
        "features": [features.start, features.stop],
        "busiest": [[f, density, top] for f, density, top in busiest],
        "rows": rows,
    }


def _handle(args: argparse.Namespace) -> None:
    from pipeline.tokens import use_tokenizer

    if not args.serve and (args.port is not None or args.host is not None):
        raise ConfigError("--port and --host say where to serve: give --serve with them.")
    if args.max_rows < 0:
        raise ConfigError(f"--max-rows {args.max_rows}: give how many dataset rows get a prompt page, 0 or more.")
    check_site_folder(args.out)  # before the store is read or the model loaded
    fs = FeatureStore.open(args.store)
    sae = chosen_sae(fs, args.sae)
    use_tokenizer(fs)  # tokens shown from the run's tokenizer's own strings (store.tokens)
    server = None
    if args.serve:  # load the model and open the port first, so that a failure costs no site writing
        from jobs.dashboard_serve import open_server, serve

        server = open_server(fs, sae, Path(args.out), args.host or "127.0.0.1",
                             8000 if args.port is None else args.port)
    index = write_dashboard(fs, sae, args.out, args.features, args.max_rows, args.logits, args.progress)
    print(terminal_text(f"wrote the dashboard to {args.out}; open {index} in a browser"))
    if server is not None:
        serve(server)
