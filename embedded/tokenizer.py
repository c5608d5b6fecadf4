"""Step 2: a byte-level BPE tokenizer trained on the train split.

Byte-level BPE covers every input (no unknown token) and round-trips text
exactly, which matters for source code where whitespace is meaning. The one
special token, ``<|endoftext|>``, serves as BOS, EOS and padding; it is not
added by the tokenizer itself because TransformerLens prepends BOS.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from embedded.corpus import read_jsonl_gz

log = logging.getLogger(__name__)

SPECIAL_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class TokenizerConfig:
    train_corpus: Path
    out_dir: Path
    # Includes the 256 byte tokens and the special token.
    vocab_size: int = 4096
    # A merge must be seen at least this often; keeps one-off identifiers out.
    min_frequency: int = 2


def texts(path: Path) -> Iterator[str]:
    for row in read_jsonl_gz(path):
        yield row["text"]


def train_tokenizer(cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Train, wrap for ``transformers`` and save to ``cfg.out_dir``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[SPECIAL_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(cfg.train_corpus), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        clean_up_tokenization_spaces=False,  # would rewrite " ," and friends in code
    )
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(cfg.out_dir))
    log.info("tokenizer: %d tokens, saved to %s", len(wrapped), cfg.out_dir)
    return wrapped


def main(argv: list[str] | None = None) -> PreTrainedTokenizerFast:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-corpus", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=TokenizerConfig.vocab_size)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return train_tokenizer(TokenizerConfig(train_corpus=args.train_corpus, out_dir=args.out_dir,
                                           vocab_size=args.vocab_size))


if __name__ == "__main__":
    main()
