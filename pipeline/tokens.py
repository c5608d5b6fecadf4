"""The run's tokenizer behind a store's token display (``store.tokens``).

A store keeps each token id decoded alone, which loses the bytes of a partial character; the
display rules need the tokenizer's own token strings. ``use_tokenizer(fs)`` loads the run's
tokenizer (a local model folder, or a hub model already in the local cache) and makes
``fs.token_display`` from it, so that every query, page and export of ``fs`` shows tokens the
same way. When the tokenizer cannot be loaded, the store's decoded vocabulary is used and a
warning says what is lost.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from store import FeatureStore
from store.tokens import TokenDisplay

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def _tokenizer_display(model: str, d_vocab: int | None) -> TokenDisplay | None:
    from pipeline.models import load_tokenizer

    lost = "tokens are shown from the store's decoded vocabulary, where a token holding part of a character shows " \
           "as <token ID>."
    if Path(model).is_absolute() and not Path(model).exists():  # a store copied, or its model folder moved
        log.warning("the run's model folder %s is not on this machine; %s", model, lost)
        return None
    try:
        tokenizer = load_tokenizer(model)
    except Exception as e:  # noqa: BLE001 - any failure to load leaves the decoded vocabulary, said below
        log.warning("could not load the tokenizer of %s (%s: %s); %s", model, type(e).__name__, e, lost)
        return None
    return None if tokenizer is None else TokenDisplay.from_tokenizer(tokenizer, d_vocab)


def use_tokenizer(fs: FeatureStore, tokenizer: Any | None = None) -> TokenDisplay:
    """Show ``fs``'s tokens through ``tokenizer`` (default: the run's, loaded once per process)
    and return the display. A store without a vocabulary (a run without a tokenizer) keeps ids."""
    if fs.vocab is None:
        return fs.token_display
    d_vocab = len(fs.vocab)
    display = (TokenDisplay.from_tokenizer(tokenizer, d_vocab) if tokenizer is not None
               else _tokenizer_display(str(fs.run["model"]["name"]), d_vocab))
    if display is not None:
        fs.token_display = display
    return fs.token_display
