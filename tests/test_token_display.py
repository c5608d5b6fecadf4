"""Token display (store.tokens): byte-level BPE and SentencePiece tokens shown as Neuronpedia shows
them, lone bytes as distinct escapes, special tokens marked; on a tokenizer built here (no hub)."""

from __future__ import annotations

import pytest

from store.tokens import OUT_OF_RANGE, TokenDisplay, show_token, tokenizer_kind

MERGES = [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("â", "Ģ"), ("âĢ", "Ļ"), ("Ã", "©"), ("Ċ", "Ċ")]


def byte_level_tokenizer():
    """A GPT-2 style byte-level BPE: the special token, the 256 byte tokens, a few merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def bpe():
    return byte_level_tokenizer()


def test_byte_level_tokens_show_their_text(bpe):
    display = TokenDisplay.from_tokenizer(bpe, d_vocab=len(bpe) + 2)
    assert display.kind == "byte_level" == tokenizer_kind(bpe)
    shown = dict(zip(bpe.convert_ids_to_tokens(list(range(len(bpe)))), display.strings))
    assert shown["Ġthe"] == " the" and shown["Ġt"] == " t" and shown["Ġ"] == " "
    assert shown["Ċ"] == "\n" and shown["ĊĊ"] == "\n\n" and shown["ĉ"] == "\t"
    assert shown["âĢĻ"] == "’" and shown["Ã©"] == "é"
    assert shown["â"] == "\\xe2" and shown["âĢ"] == "\\xe2\\x80" and shown["Ã"] == "\\xc3"
    assert shown["a"] == "a" and shown["<|endoftext|>"] == "<|endoftext|>"
    assert display.text([len(bpe), len(bpe) + 1]) == [OUT_OF_RANGE, OUT_OF_RANGE]  # the model's padding ids


def test_every_lone_byte_is_distinct_and_never_a_replacement_character(bpe):
    display = TokenDisplay.from_tokenizer(bpe)
    single_bytes = [bpe.convert_tokens_to_ids(ch) for ch in sorted(__import__("tokenizers").pre_tokenizers
                                                                    .ByteLevel.alphabet())]
    texts = display.text(single_bytes)
    assert len(set(texts)) == 256 and not any("\ufffd" in t for t in texts)
    high = [t for t in texts if t.startswith("\\x")]
    assert sorted(high) == [f"\\x{b:02x}" for b in range(0x80, 0x100)]
    # decoding each id alone, as the store's vocabulary does, makes all 128 of them one "�"
    decoded = bpe.batch_decode([[i] for i in single_bytes])
    assert sum(t == "\ufffd" for t in decoded) == 128
    # the fallback from such a vocabulary still tells them apart, by id
    fallback = TokenDisplay.from_decoded(bpe.batch_decode([[i] for i in range(len(bpe))]), special_ids={0})
    assert len(set(fallback.text(single_bytes))) == 256 and not any("\ufffd" in t for t in fallback.strings)
    assert fallback.text([bpe.convert_tokens_to_ids("â")]) == [f"<token {bpe.convert_tokens_to_ids('â')}>"]


def test_text_joins_back_to_the_string(bpe):
    text = "the cat’s café\n\nthe end\tok"
    ids = bpe(text)["input_ids"]
    assert "".join(TokenDisplay.from_tokenizer(bpe).text(ids)) == text


def test_sentencepiece_and_special_tokens():
    assert show_token("▁the", "sentencepiece") == " the"
    assert show_token("<0x0A>", "sentencepiece") == "\n"
    assert show_token("<0xE2>", "sentencepiece") == "\\xe2"
    assert show_token("ĠHello", "plain") == "ĠHello"
    display = TokenDisplay.from_tokens(["bos", "[UNK]", "<pad>", "Ġa", None], "byte_level",
                                       special={0: "bos", 1: "[UNK]", 2: "<pad>"}, d_vocab=6)
    assert display.strings == ("<bos>", "[UNK]", "<pad>", " a", OUT_OF_RANGE, OUT_OF_RANGE)
    ids_only = TokenDisplay.from_decoded(None)  # no vocabulary: ids, from a table grown as larger ones come
    assert ids_only.text([0]) == ["0"] and ids_only.text([3, 1]) == ["3", "1"]
    assert ids_only.text([70_000, 2, 0]) == ["70000", "2", "0"] and ids_only.text([]) == []
    assert ids_only.text([-1, 5]) == ["-1", "5"] and ids_only.text([2**40]) == [str(2**40)]
    assert len(ids_only._lookup) == 2**17  # the next power of two past 70,000, never grown to 2^40


@pytest.mark.ray
def test_queries_and_top_show_tokens_through_the_runs_tokenizer(assets, ray_cluster, tmp_path_factory, monkeypatch,
                                                                 capsys, bpe):
    """The store's ids read through another tokenizer, to tell its display from the stored vocabulary."""
    import pipeline.models
    from jobs.cli import main
    from pipeline import tokens
    from tests.stores import shared_store

    fs = shared_store(assets, tmp_path_factory)
    sae, feature = fs.saes[0], int(fs.stats(fs.saes[0]).count.argmax())
    before = fs.top_activations(sae, feature, k=3, context=(2, 1))
    assert before["token"].tolist() == [fs.vocab[i] for i in before["token_id"]]  # the decoded vocabulary
    display = tokens.use_tokenizer(fs, bpe)
    assert fs.token_display is display and display.kind == "byte_level"
    after = fs.top_activations(sae, feature, k=3, context=(2, 1))
    assert after["token"].tolist() == display.text(after["token_id"])
    ids = fs.token_ids()
    t = int(after["token_index"][0])
    assert f"«{display.text([ids[t]])[0]}»" in after["context"][0]
    # the command loads the run's tokenizer (here replaced by the byte-level one) for its context column
    monkeypatch.setattr(pipeline.models, "load_tokenizer", lambda spec: bpe)
    tokens._tokenizer_display.cache_clear()
    try:
        assert main(["top", fs.location, "--sae", sae, "--feature", str(feature), "-k", "3",
                     "--context", "2", "1"]) == 0
    finally:
        tokens._tokenizer_display.cache_clear()
    out = capsys.readouterr().out
    assert all(context in out for context in after["context"])


def test_a_plain_tokenizer_shows_each_token_decoded_alone(assets):
    tokenizer = assets["tokenizer"]  # word-level, no decoder
    display = TokenDisplay.from_tokenizer(tokenizer)
    assert display.kind == "plain"
    assert list(display.strings) == tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    assert display.text([0, 1, 2]) == ["<|endoftext|>", "[UNK]", "the"]


def test_a_sentencepiece_style_tokenizer():
    """Llama 2's shape: ▁ for spaces and byte-fallback tokens <0xNN>, undone by its decoder."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             "▁": 259, "t": 260, "h": 261, "e": 262, "▁t": 263, "▁th": 264, "▁the": 265}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "t"), ("▁t", "h"), ("▁th", "e")], byte_fallback=True,
                               unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    display = TokenDisplay.from_tokenizer(fast)
    assert display.kind == "sentencepiece"
    assert display.text([265, 259, 3 + 0x0A, 3 + 0xE2, 3 + ord("a"), 1, 2, 0]) == \
        [" the", " ", "\n", "\\xe2", "a", "<s>", "</s>", "<unk>"]


def test_a_model_folder_that_is_gone_is_said_so_and_the_vocabulary_shows(tmp_path, caplog):
    from pipeline.tokens import _tokenizer_display

    gone = str(tmp_path / "moved-model")
    with caplog.at_level("WARNING", logger="pipeline.tokens"):
        assert _tokenizer_display(gone, 10) is None
    assert caplog.messages == [f"the run's model folder {gone} is not on this machine; tokens are shown from the "
                               "store's decoded vocabulary, where a token holding part of a character shows as "
                               "<token ID>."]
