"""Tokenizers: OpenAI's GPT-2 BPE against tiktoken and transformers, our trainer against the reference BPE."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import tiktoken
import torch
from conftest import TEXT, assert_ok, make_tokenizer, run_without_package
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, GPT2Tokenizer, GPT2TokenizerFast

from gpt2_scratch.bpe import ReferenceBPE, bytes_to_unicode
from gpt2_scratch.cli import main as cli
from gpt2_scratch.sources import fetch, shakespeare_text
from gpt2_scratch.tokenizer import (
    ENDOFTEXT,
    causal_lm_labels,
    load_gpt2_tokenizer,
    train_tokenizer,
    with_stock_settings,
)

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

VARIED = (
    "def f(x):\n\treturn x**2  # squares\n\n\n"
    "Numbers: 3.14159, 1,000,000 and 2026-11-25; 0x1F600.\n"
    "Emoji: 😀👍🏽🇫🇷 and family 👨‍👩‍👧‍👦!\n"
    "CJK: 日本語のテキスト、中文文本，한국어 텍스트.\n"
    "Combining: e\u0301 a\u0308 n\u0303, Zalgo: Z\u0364\u0351a\u0301l\u0300g\u0302o\u0303\n"
    "Spaces:    four, then a tab\t, then many\n\n\n\n   indented   \n"
    f"The end.{ENDOFTEXT}A new document: don't, I'll, we've, they're.\r\n"
)


@pytest.fixture(scope="module")
def gpt2_files():
    return fetch("gpt2_bpe")


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return load_gpt2_tokenizer(gpt2_files)


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2_files):
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    encoder = json.loads((gpt2_files / "encoder.json").read_text())
    ranks = {bytes(byte_of[c] for c in token): i for token, i in encoder.items() if token != ENDOFTEXT}
    return tiktoken.Encoding("gpt2-ranks", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: encoder[ENDOFTEXT]})


@pytest.fixture(scope="module")
def transformers_format(gpt2_files, tmp_path_factory):
    """The Hub's openai-community/gpt2 tokenizer files: OpenAI's two files under transformers' names."""
    folder = tmp_path_factory.mktemp("hf_gpt2")
    shutil.copy(gpt2_files / "encoder.json", folder / "vocab.json")
    shutil.copy(gpt2_files / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(scope="module")
def hf_gpt2(transformers_format):
    return GPT2TokenizerFast.from_pretrained(transformers_format)


def test_gpt2_tokenizer_layout(gpt2):
    assert len(gpt2) == 50257
    assert gpt2.convert_tokens_to_ids(ENDOFTEXT) == 50256
    assert gpt2.eos_token_id == gpt2.bos_token_id == gpt2.pad_token_id == 50256


@pytest.mark.parametrize("sample", ["varied", "shakespeare"])
def test_gpt2_ids_equal_tiktoken_and_transformers(gpt2, tiktoken_gpt2, hf_gpt2, sample):
    text = VARIED if sample == "varied" else shakespeare_text()[100_000:160_000]
    ours = gpt2(text)["input_ids"]
    assert ours == tiktoken_gpt2.encode(text, allowed_special="all")
    assert ours == hf_gpt2(text)["input_ids"]
    assert gpt2.decode(ours) == text


def test_transformers_and_openai_file_formats_load_the_same(gpt2, transformers_format, tmp_path):
    from_hf_format = load_gpt2_tokenizer(transformers_format)
    assert from_hf_format(VARIED)["input_ids"] == gpt2(VARIED)["input_ids"]
    with pytest.raises(FileNotFoundError, match="neither vocab.json"):
        load_gpt2_tokenizer(tmp_path / "nothing")


CORPORA = {
    "hamlet": TEXT,
    "mixed": VARIED * 3 + "aaaa aaa aa a bbb abab abba " * 5,
    "ties": "ab ba cd dc ef fe " * 3 + "xyzzy " * 2,
}


@pytest.mark.parametrize("corpus", list(CORPORA))
@pytest.mark.parametrize("vocab_size, min_frequency", [(300, 2), (420, 1), (1000, 2)])
def test_reference_bpe_learns_the_fast_trainers_merges(corpus, vocab_size, min_frequency):
    texts = [CORPORA[corpus]]
    fast = train_tokenizer(texts, vocab_size, min_frequency, show_progress=False)
    reference = ReferenceBPE.train(texts, vocab_size, min_frequency)
    fast_merges = [tuple(m) for m in json.loads(fast.backend_tokenizer.to_str())["model"]["merges"]]
    assert reference.merges == fast_merges
    assert reference.vocab == fast.get_vocab()
    for text in (CORPORA[corpus], VARIED):
        assert reference.encode(text) == fast(text)["input_ids"]


def fast_merges(texts: list[str], vocab_size: int, *min_frequency: int) -> list[tuple[str, str]]:
    fast = train_tokenizer(texts, vocab_size, *min_frequency, show_progress=False)
    return [tuple(m) for m in json.loads(fast.backend_tokenizer.to_str())["model"]["merges"]]


def test_reference_bpe_defaults_floor_and_alphabet_are_the_fast_trainers():
    from transformers.convert_slow_tokenizer import bytes_to_unicode as transformers_bytes_to_unicode

    assert bytes_to_unicode() == transformers_bytes_to_unicode()  # GPT-2's stand-ins for the 256 bytes
    assert ReferenceBPE.train([CORPORA["ties"]], 1000).merges == fast_merges([CORPORA["ties"]], 1000)  # default 2
    once = ["the quick brown fox jumps over a lazy dog"]  # every pair seen once: merged only at a floor of 1
    assert ReferenceBPE.train(once, 1000, 1).merges == fast_merges(once, 1000, 1) != []
    assert ReferenceBPE.train(once, 1000, 0).merges == fast_merges(once, 1000, 1)  # a count is at least 1
    assert ReferenceBPE.train(once, 1000).merges == fast_merges(once, 1000) == []


def test_reference_bpe_decodes_its_ids():
    reference = ReferenceBPE.train([TEXT], 300)
    text = "To be, or not<|endoftext|> to bé!\n 42<|endoftext|>"
    assert reference.decode(reference.encode(text)) == text
    assert reference.tokenize(text)[-1] == ENDOFTEXT and reference.vocab[ENDOFTEXT] == len(reference.vocab) - 1
    assert reference.decode([reference.vocab["Ã"]]) == "\ufffd"  # half of "é" in UTF-8 is not a character


def test_trained_tokenizer_layout_and_padding_policy():
    tokenizer = train_tokenizer([TEXT], 300, show_progress=False)
    assert len(tokenizer) == 300 and tokenizer.eos_token_id == 299 == tokenizer.pad_token_id
    batch = tokenizer([f"To be{ENDOFTEXT}", "or not to be, that is"], padding=True, return_tensors="pt")
    labels = causal_lm_labels(batch["input_ids"], batch["attention_mask"])
    first = batch["input_ids"][0]
    end = int(batch["attention_mask"][0].sum())
    assert first[end - 1] == tokenizer.eos_token_id and labels[0, end - 1] == tokenizer.eos_token_id  # learned
    assert torch.all(labels[0, end:] == -100) and torch.all(first[end:] == tokenizer.pad_token_id)
    assert torch.equal(labels[1], batch["input_ids"][1])


def test_trained_tokenizer_loads_with_autotokenizer_in_a_fresh_process(tmp_path):
    tokenizer = train_tokenizer([TEXT], 320, show_progress=False)
    tokenizer.save_pretrained(tmp_path / "tok")
    expected = tokenizer(VARIED)["input_ids"]
    result = run_without_package(
        f"""
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / "tok")!r})
        assert tokenizer({VARIED!r})["input_ids"] == {expected!r}
        assert tokenizer.eos_token == {ENDOFTEXT!r} and tokenizer.pad_token == {ENDOFTEXT!r}
        print("OK")
        """,
        cwd=tmp_path,
    )
    assert_ok(result)


def test_pieces_tokenize_like_the_whole_text():
    from gpt2_scratch.tokenizer import pieces_of

    text = ("Line one.\n\n  indented\n\tTabbed line\nplain\n" * 40) + "end"
    pieces = list(pieces_of(text, lines_per_piece=3))
    assert len(pieces) > 10 and "".join(pieces) == text
    tokenizer = train_tokenizer([TEXT], 300, show_progress=False)
    whole = tokenizer(text)["input_ids"]
    assert [i for piece in pieces for i in tokenizer(piece)["input_ids"]] == whole


def test_trains_from_files_folders_and_datasets(tmp_path):
    from datasets import Dataset

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(TEXT[: len(TEXT) // 2])
    (tmp_path / "docs" / "b.txt").write_text(TEXT[len(TEXT) // 2 :])
    (tmp_path / "all.txt").write_text(TEXT)
    vocabularies = [
        train_tokenizer(source, 300, show_progress=False).get_vocab()
        for source in (tmp_path / "all.txt", tmp_path / "docs", Dataset.from_dict({"text": [TEXT]}), [TEXT])
    ]
    assert all(v == vocabularies[0] for v in vocabularies)


def test_bad_training_input(tmp_path):
    with pytest.raises(ValueError, match="corpus is empty"):
        train_tokenizer(["", "   \n"], 300, show_progress=False)
    with pytest.raises(ValueError, match="smaller than the 256-byte alphabet plus <\\|endoftext\\|>; use at least 257"):
        train_tokenizer([TEXT], 200, show_progress=False)
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text \\(invalid byte at offset 3\\)"):
        train_tokenizer(tmp_path / "latin1.txt", 300, show_progress=False)
    with pytest.raises(FileNotFoundError, match="no such file"):
        train_tokenizer(tmp_path / "missing.txt", 300, show_progress=False)


def test_isolated_spaces_and_split_digits(tmp_path):
    corpus = "the cat sat on the mat\ncat and mat 1234 + 56\n" * 50
    tokenizer = train_tokenizer([corpus], 300, show_progress=False, isolate_spaces=True, split_digits=True)
    word = tokenizer("cat", add_special_tokens=False)["input_ids"]
    space, newline = (tokenizer(c, add_special_tokens=False)["input_ids"] for c in (" ", "\n"))
    assert len(word) == 1 and len(space) == 1 and len(newline) == 1
    # the same word gets the same token after a space, after a newline and at the start
    assert tokenizer("mat cat\ncat", add_special_tokens=False)["input_ids"][1:] == space + word + newline + word
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("the cat 1234 + 56", add_special_tokens=False)["input_ids"])
    assert tokens == ["the", "Ġ", "cat", "Ġ", "1", "2", "3", "4", "Ġ", "+", "Ġ", "5", "6"]
    assert tokenizer.decode(tokenizer(VARIED)["input_ids"]) == VARIED
    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded(VARIED)["input_ids"] == tokenizer(VARIED)["input_ids"]
    # Saved as the class that reads tokenizer.json as it is: GPT2Tokenizer would rebuild GPT-2's pre-tokeniser.
    saved = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "TokenizersBackend"
    assert pre_tokenizer_of(reloaded) == pre_tokenizer_of(tokenizer) != pre_tokenizer_of(
        GPT2Tokenizer.from_pretrained(tmp_path / "tok"))
    default = train_tokenizer([corpus], 300, show_progress=False)
    assert default("mat cat", add_special_tokens=False)["input_ids"][1:] != word  # GPT-2's " cat" differs


def pre_tokenizer_of(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"]


def test_saved_tokenizers_carry_stock_gpt2_settings(gpt2, tmp_path):
    """What CTranslate2 and other GPT-2 readers need: <|endoftext|> as unk too, and a class they know."""
    for name, tokenizer in (("openai", gpt2), ("trained", train_tokenizer([TEXT], 300, show_progress=False))):
        tokenizer.save_pretrained(tmp_path / name)
        settings = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
        assert settings["tokenizer_class"] == "GPT2Tokenizer" and settings["unk_token"] == ENDOFTEXT
        reloaded = AutoTokenizer.from_pretrained(tmp_path / name)
        assert isinstance(reloaded, GPT2Tokenizer) and reloaded(VARIED)["input_ids"] == tokenizer(VARIED)["input_ids"]
    assert gpt2.model_max_length == 1024
    stock = with_stock_settings(make_tokenizer(), 64)  # an older folder's tokenizer, re-saved: same ids
    assert (stock.unk_token, stock.model_max_length) == (ENDOFTEXT, 64)
    assert stock(VARIED)["input_ids"] == make_tokenizer()(VARIED)["input_ids"]
    with pytest.raises(ValueError, match=re.escape("the tokenizer has no <|endoftext|> token")):
        with_stock_settings(GPT2Tokenizer(vocab={"a": 0, "b": 1}, merges=[], unk_token="a", bos_token="a",
                                          eos_token="a"), 64)


def test_train_tokenizer_cli(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(TEXT.replace(". ", ".\n"))
    assert cli(["train-tokenizer", "--corpus", str(tmp_path / "corpus.txt"), "--vocab-size", "300",
                "--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "vocabulary: 300 tokens" in out and "bytes/token" in out
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert cli(["train-tokenizer", "--corpus", str(tmp_path / "corpus.txt"), "--vocab-size", "300",
                "--isolate-spaces", "--split-digits", "--out", str(tmp_path / "apart")]) == 0
    apart = AutoTokenizer.from_pretrained(tmp_path / "apart")
    assert apart.convert_ids_to_tokens(apart(" 42", add_special_tokens=False)["input_ids"]) == ["Ġ", "4", "2"]

    (tmp_path / "empty.txt").write_text("")
    assert cli(["train-tokenizer", "--corpus", str(tmp_path / "empty.txt"), "--vocab-size", "300",
                "--out", str(tmp_path / "bad")]) == 2
    assert "empty.txt is empty" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@settings(max_examples=3000, deadline=None)
@given(unicode_text)
def test_gpt2_round_trips_any_unicode(gpt2, text):
    assert gpt2.decode(gpt2(text)["input_ids"]) == text


TRAINED = train_tokenizer([TEXT, VARIED], 400, show_progress=False)
REFERENCE = ReferenceBPE.train([TEXT, VARIED], 400)
APART = train_tokenizer([TEXT, VARIED], 400, show_progress=False, isolate_spaces=True, split_digits=True)


@settings(max_examples=3000, deadline=None)
@given(unicode_text)
def test_trained_tokenizers_round_trip_any_unicode(text):
    ids = TRAINED(text)["input_ids"]
    assert TRAINED.decode(ids) == text
    assert REFERENCE.encode(text) == ids
    assert REFERENCE.decode(ids) == text
    assert APART.decode(APART(text)["input_ids"]) == text
