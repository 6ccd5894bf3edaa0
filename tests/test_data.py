"""Tests of the data layer: tokenizers, shipped corpora, caching, offline failures."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import dataloader
import utils
from data import detokenizers, local_text, tokenization
from data import grid as grid_data
from data import sources as data_sources
from dataloader import DataUnavailableError, get_dataloaders, get_dataset, get_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
L = 64


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Set after `datasets` was imported: the data layer must honour it anyway.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def data_cfg(name: str, cache_dir: Path, **overrides):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg.cache_dir = str(cache_dir)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def run_cfg(data, batch_size: int = 8, length: int = L):
    return OmegaConf.create(
        {
            "data": data,
            "model": {"length": length},
            "loader": {
                "batch_size": batch_size,
                "eval_batch_size": batch_size,
                "num_workers": 0,
                "pin_memory": False,
            },
            "seed": 1,
        }
    )


@pytest.fixture(scope="module")
def bible_cache(tmp_path_factory):
    """One cache folder shared by the bible tests, so the BPE is trained once."""
    return tmp_path_factory.mktemp("bible-cache")


@pytest.fixture(scope="module")
def bible(bible_cache):
    cfg = data_cfg("bible", bible_cache)
    return cfg, get_tokenizer(cfg)


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer(OmegaConf.create({"tokenizer_name_or_path": "gpt2"}))


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = [f"Paragraph {i} of the text file talks about topic {i}." for i in range(30)]
    (folder / "a.txt").write_text("\n\n".join(paragraphs) + "\n")
    lines = [f'{{"text": "JSON document number {i}."}}' for i in range(15)]
    (folder / "b.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "ignored.csv").write_text("not,text\n")


# ---------------------------------------------------------------- tokenizers


def test_gpt2_tokenizer_from_shipped_files(gpt2):
    assert len(gpt2) == 50257
    assert gpt2("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert gpt2.bos_token_id == gpt2.eos_token_id == gpt2.pad_token_id == 50256
    assert gpt2.pad_token_id != len(gpt2)  # mask id = len(tokenizer) = 50257


def test_text8_tokenizer_is_character_level():
    tok = get_tokenizer(OmegaConf.create({"tokenizer_name_or_path": "text8"}))
    assert len(tok) == 31
    ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    assert len(ids) == 11 and tok.decode(ids) == "hello world"
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)}) == 4


def test_bert_tokenizer_or_fast_offline_error(no_network):
    cfg = OmegaConf.create({"tokenizer_name_or_path": "bert-base-uncased"})
    try:
        tok = get_tokenizer(cfg)
    except DataUnavailableError as err:  # neither the shipped vocab nor a hub cache here
        assert "bert-base-uncased" in str(err)
    else:
        assert len(tok) == 30522 and tok.pad_token_id != len(tok)
        assert tok.bos_token == "[CLS]" and tok.eos_token == "[SEP]"
    assert no_network == []  # offline: answered without trying the hub


def test_bpe_trained_on_train_split_and_cached(bible, bible_cache, monkeypatch):
    cfg, tok = bible
    assert len(tok) == 2048
    assert [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2]
    files = list((bible_cache / "tokenizers").glob("bible-bpe2048-*.json"))
    assert len(files) == 1
    # A second call must load the cached file, not train again.
    monkeypatch.setattr(tokenization, "_train_bpe", lambda *a: pytest.fail("BPE retrained"))
    again = get_tokenizer(cfg)
    text = "In the beginning God created the heaven and the earth."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == text


def test_bpe_sees_only_training_text(bible_cache, monkeypatch):
    seen = []
    original = tokenization._train_bpe

    def spy(texts, vocab_size):
        texts = list(texts)
        seen.extend(texts)
        return original(iter(texts), vocab_size)

    monkeypatch.setattr(tokenization, "_train_bpe", spy)
    get_tokenizer(data_cfg("bible", bible_cache / "fresh", tokenizer_name_or_path="bpe-300"))
    chapters = data_sources.bible_chapters()
    assert seen == [c for i, c in enumerate(chapters) if i % 20]


# ---------------------------------------------------------------- the embedded bible


def test_bible_chapters_split_disjoint():
    chapters = data_sources.bible_chapters()
    assert len(chapters) == 1189  # the KJV's chapter count
    assert chapters[0].startswith("In the beginning God created")
    train = data_sources.every_20th(chapters, "train")
    valid = data_sources.every_20th(chapters, "validation")
    assert len(valid) == 60 and len(train) == 1129
    assert not set(train) & set(valid)


def test_bible_wrapped_rows(bible):
    cfg, tok = bible
    train = get_dataset(cfg, tok, "train", L)
    valid = get_dataset(cfg, tok, "validation", L)
    assert len(train) > 10 * len(valid) > 0
    for rows in (train, valid):
        ids, mask = rows[:]["input_ids"], rows[:]["attention_mask"]
        assert ids.dtype == mask.dtype == torch.long and ids.shape == (len(rows), L)
        assert (ids[:, 0] == tok.bos_token_id).all() and (ids[:, -1] == tok.eos_token_id).all()
        assert (mask == 1).all()
        assert ids.max() < len(tok)  # never the mask id
    # Documents are closed with EOS inside the stream: about one per chapter.
    inner_eos = (train[:]["input_ids"][:, 1:-1] == tok.eos_token_id).sum()
    assert 1000 < inner_eos <= 1129
    assert train[0]["input_ids"].shape == (L,)


def test_processed_cache_is_reused(bible, bible_cache, monkeypatch):
    cfg, tok = bible
    first = get_dataset(cfg, tok, "validation", L)
    folders = list((bible_cache / "datasets").glob("bible_validation_*"))
    assert len(folders) == 1 and not list((bible_cache / "datasets").glob("*.tmp-*"))
    monkeypatch.setattr(dataloader, "_encode", lambda *a: pytest.fail("re-tokenised"))
    second = get_dataset(cfg, get_tokenizer(cfg), "validation", L)  # a fresh tokenizer
    assert torch.equal(first[:]["input_ids"], second[:]["input_ids"])


def test_interrupted_build_leaves_no_cache(tmp_path, gpt2, monkeypatch):
    write_corpus(tmp_path / "corpus")
    cfg = data_cfg("local_text", tmp_path / "cache", path=str(tmp_path / "corpus"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataloader.datasets.Dataset, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        get_dataset(cfg, gpt2, "train", L)
    assert not list((tmp_path / "cache" / "datasets").iterdir())
    monkeypatch.undo()
    assert len(get_dataset(cfg, gpt2, "train", L)) > 0


def test_dataloaders_batches_and_seeded_shuffle(bible):
    cfg, tok = bible
    train, valid = get_dataloaders(run_cfg(cfg), tok)
    batch = next(iter(train))
    assert batch["input_ids"].shape == (8, L) and batch["attention_mask"].shape == (8, L)
    assert len(train) == len(train.dataset) // 8  # drop_last
    assert len(valid) == -(-len(valid.dataset) // 8)  # keeps the partial batch
    again, _ = get_dataloaders(run_cfg(cfg), tok, skip_valid=True)
    assert torch.equal(next(iter(again))["input_ids"], batch["input_ids"])
    first_valid = next(iter(valid))["input_ids"]
    assert torch.equal(first_valid, valid.dataset[:8]["input_ids"])  # not shuffled
    assert get_dataloaders(run_cfg(cfg), tok, skip_train=True, skip_valid=True) == (None, None)


def test_too_few_rows_for_a_batch(bible):
    cfg, tok = bible
    with pytest.raises(DataUnavailableError, match="bible.*loader.batch_size"):
        get_dataloaders(run_cfg(cfg, batch_size=100_000), tok, skip_valid=True)


def test_streaming_is_tokenised_lazily_and_not_cached(bible, tmp_path, monkeypatch):
    cfg, tok = bible
    rows = len(get_dataset(cfg, tok, "valid", L))  # built (or read) before the patch
    bible_source = data_sources.SOURCES["bible"]

    def load_streamed(data_cfg, split):  # what a hub source returns with streaming=True
        return bible_source.load(data_cfg, split).to_iterable_dataset()

    streamed = data_sources.Source(load_streamed, bible_source.fingerprint)
    monkeypatch.setitem(data_sources.SOURCES, "bible", streamed)
    cfg = data_cfg("bible", tmp_path, streaming=True)
    train, valid = get_dataloaders(run_cfg(cfg), tok)
    batch = next(iter(train))
    assert batch["input_ids"].shape == (8, L) and batch["input_ids"].dtype == torch.long
    assert (batch["input_ids"][:, 0] == tok.bos_token_id).all()
    assert sum(len(b["input_ids"]) for b in valid) == rows
    assert not (tmp_path / "datasets").exists()


@pytest.mark.parametrize("shards", [1, 4])  # one stream: every 2nd row; 4 files: whole ones
def test_a_streamed_dataset_is_split_across_ranks(bible, tmp_path, monkeypatch, shards):
    cfg, tok = bible
    everything = [tuple(r["input_ids"].tolist()) for r in get_dataset(cfg, tok, "valid", L)]
    bible_source = data_sources.SOURCES["bible"]

    def load_streamed(data_cfg, split):
        return bible_source.load(data_cfg, split).to_iterable_dataset(num_shards=shards)

    streamed = data_sources.Source(load_streamed, bible_source.fingerprint)
    monkeypatch.setitem(data_sources.SOURCES, "bible", streamed)
    cfg = data_cfg("bible", tmp_path, streaming=True)
    valid = get_dataloaders(run_cfg(cfg), tok, skip_train=True)[1]
    seen = []
    for rank in range(2):
        monkeypatch.setattr(utils, "rank_world", lambda r=rank: (r, 2))
        seen.append([tuple(row.tolist()) for b in valid for row in b["input_ids"]])
    assert not set(seen[0]) & set(seen[1]) and min(map(len, seen)) > len(everything) // 4
    if shards == 1:  # every 2nd row of the one stream: exactly the rows, each once
        assert sorted(seen[0] + seen[1]) == sorted(everything)
    else:  # whole files per rank: each packs its own documents into rows
        assert abs(len(seen[0]) + len(seen[1]) - len(everything)) <= shards


# ---------------------------------------------------------------- local text


def test_local_text_folder(tmp_path, gpt2):
    write_corpus(tmp_path / "corpus")
    cfg = data_cfg("local_text", tmp_path / "cache", path=str(tmp_path / "corpus"))
    documents = local_text.local_documents(cfg)
    assert len(documents) == 45  # 30 paragraphs + 15 JSON lines; the .csv is ignored
    assert documents[0].startswith("Paragraph 0") and documents[-1] == "JSON document number 14."
    valid = list(data_sources.SOURCES["local_text"].load(cfg, "validation")["text"])
    train = list(data_sources.SOURCES["local_text"].load(cfg, "train")["text"])
    assert sorted(train + valid) == sorted(documents) and not set(train) & set(valid)
    # 2,000 characters in all, so valid_min_chars (20,000) caps the share at one half
    assert abs(sum(map(len, valid)) / sum(map(len, documents)) - 0.5) < 0.05
    rows = get_dataset(cfg, gpt2, "train", 16)
    assert rows[0]["input_ids"].shape == (16,) and rows[0]["input_ids"][0] == 50256


def test_local_text_bpe_keyed_by_content(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = data_cfg("local_text", tmp_path / "cache", path=str(tmp_path / "corpus"))
    get_tokenizer(cfg)
    (tmp_path / "corpus" / "c.txt").write_text("A new file changes the training text.")
    get_tokenizer(cfg)
    assert len(list((tmp_path / "cache" / "tokenizers").glob("local_text-bpe2048-*"))) == 2


@pytest.mark.parametrize("min_chars", [0, 3000])
def test_local_text_single_file_is_cut_at_the_held_out_share(tmp_path, gpt2, min_chars):
    (tmp_path / "one.txt").write_text(" ".join(f"word{i}" for i in range(2000)))  # 16,889 chars
    cfg = data_cfg("local_text", tmp_path / "cache", path=str(tmp_path / "one.txt"))
    cfg.valid_min_chars = min_chars
    train = data_sources.SOURCES["local_text"].load(cfg, "train")["text"][0]
    valid = data_sources.SOURCES["local_text"].load(cfg, "validation")["text"][0]
    assert train + valid == (tmp_path / "one.txt").read_text()
    expected = max(0.05, min_chars / 16889)  # valid_fraction, raised to valid_min_chars
    assert abs(len(valid) / (len(train) + len(valid)) - expected) < 0.01
    assert valid.startswith(" word")  # cut at a space, not inside a word


def test_held_out_documents_are_spread_evenly_and_take_the_share():
    flags = local_text.held_out([100] * 100, 0.05)
    assert [i for i, f in enumerate(flags) if f] == [10, 30, 50, 70, 90]
    lengths = [(i * 37) % 500 + 20 for i in range(400)]  # uneven documents
    flags = local_text.held_out(lengths, 0.1)
    held = [n for n, f in zip(lengths, flags, strict=True) if f]
    assert abs(sum(held) / sum(lengths) - 0.1) < 0.01
    positions = [i for i, f in enumerate(flags) if f]
    assert positions[0] < 40 and positions[-1] > 360  # from every part of the corpus
    assert local_text.held_out([5, 5], 0.01) in ([True, False], [False, True])  # >= 1 each
    assert local_text.held_out([5, 5], 0.5).count(False) >= 1


@pytest.mark.parametrize(
    "fraction,min_chars,total,share",
    [(0.05, 0, 10_000, 0.05), (0.05, 1_000, 10_000, 0.1), (0.05, 10**6, 10_000, 0.5)],
)
def test_valid_share_is_the_fraction_raised_to_the_minimum_and_capped(
    fraction, min_chars, total, share
):
    cfg = OmegaConf.create({"valid_fraction": fraction, "valid_min_chars": min_chars})
    assert local_text.valid_share(cfg, total) == pytest.approx(share)


def test_changing_the_held_out_rule_changes_the_cache_key(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = data_cfg("local_text", tmp_path / "cache", path=str(tmp_path / "corpus"))
    before = data_sources.SOURCES["local_text"].fingerprint(cfg)
    cfg.valid_fraction = 0.1
    assert data_sources.SOURCES["local_text"].fingerprint(cfg) != before


@pytest.mark.parametrize("case", ["missing", "empty", "no_text_files", "blank", "unset"])
def test_local_text_errors_name_the_path(tmp_path, gpt2, case):
    path = tmp_path / "corpus"
    if case != "missing":
        path.mkdir()
    if case == "no_text_files":
        (path / "data.csv").write_text("a,b\n")
    if case == "blank":
        (path / "blank.txt").write_text("\n\n  \n")
    cfg = data_cfg("local_text", tmp_path / "cache", path=None if case == "unset" else str(path))
    with pytest.raises(DataUnavailableError) as err:
        get_dataset(cfg, gpt2, "train", L)
    assert "data.path" in str(err.value) and "\n" not in str(err.value)
    if case != "unset":
        assert str(path) in str(err.value)
    if case == "missing":
        assert "does not exist" in str(err.value)


BAD_FILES = {  # name: (content, what the one-line error must say)
    "binary.txt": (b"\x00\x01\x02PK\x03\x04" * 20, "looks binary"),
    "latin1.txt": ("caf\xe9 au lait".encode("latin1"), "is not UTF-8 (byte 3"),
    "broken.jsonl": (b'{"text": "ok"}\n{"text": "no end}\n', "broken.jsonl:2 is not valid JSON"),
    "number.jsonl": (b'{"text": "ok"}\n{"text": 42}\n', "number.jsonl:2: 'text' is a int, not"),
    "list.jsonl": (b'["text"]\n', "list.jsonl:1 has no 'text' field"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_data_files_are_one_line_naming_file_and_line(tmp_path, name):
    content, message = BAD_FILES[name]
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text("A good paragraph.")
    (folder / name).write_bytes(content)
    cfg = data_cfg("local_text", tmp_path / "cache", path=str(folder))
    with pytest.raises(DataUnavailableError) as err:
        local_text.local_documents(cfg)
    assert message in str(err.value) and str(folder / name) in str(err.value)
    assert "\n" not in str(err.value)


def test_a_one_byte_file_is_a_document_or_nothing_but_never_a_crash(tmp_path):
    (tmp_path / "one.txt").write_text("x")
    cfg = data_cfg("local_text", tmp_path / "cache", path=str(tmp_path / "one.txt"))
    assert local_text.local_documents(cfg) == ["x"]


def test_symlinked_folders_inside_the_corpus_are_followed_once(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    for i in range(10):
        (real / f"{i}.txt").write_text(f"Document {i}.")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "own.txt").write_text("The corpus's own document.")
    (corpus / "linked").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(corpus, target_is_directory=True)  # a cycle ends
    cfg = data_cfg("local_text", tmp_path / "cache", path=str(corpus))
    documents = local_text.local_documents(cfg)
    assert sorted(documents) == sorted(
        ["The corpus's own document."] + [f"Document {i}." for i in range(10)]
    )


def test_unwrapped_rows_are_padded(tmp_path, gpt2):
    corpus = tmp_path / "corpus.jsonl"
    texts = ["Hello world"] * 19 + [" ".join(["long"] * 200)] * 21
    corpus.write_text("\n".join(f'{{"text": "{t}"}}' for t in texts))
    cfg = data_cfg("local_text", tmp_path / "cache", path=str(corpus), wrap=False)
    rows = get_dataset(cfg, gpt2, "validation", 16)  # half the text: some of each kind
    short = next(r for r in rows if r["attention_mask"][4] == 0)
    long = next(r for r in rows if r["attention_mask"][4] == 1)
    assert short["input_ids"][:4].tolist() == [50256, 15496, 995, 50256]
    assert (short["input_ids"][4:] == gpt2.pad_token_id).all()
    assert short["attention_mask"].tolist() == [1] * 4 + [0] * 12
    # Long documents are truncated to BOS + 14 tokens + EOS.
    assert long["attention_mask"].all() and long["input_ids"][-1] == gpt2.eos_token_id
    assert long["input_ids"][1:-1].tolist() == gpt2(" ".join(["long"] * 14))["input_ids"]


def test_unwrapped_padding_with_bpe_pad_id(bible):
    cfg, tok = bible
    flat, lengths = dataloader._encode(tok, ["And God said", "", "Let there be light"])
    out = dataloader._pad(flat, lengths, 8, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (3, 8) and ids[1, :3].tolist() == [0, 1, 2]  # empty: BOS EOS pad
    assert ((ids == tok.pad_token_id) == (mask == 0)).all()


# ---------------------------------------------------------------- hub datasets offline


@pytest.mark.parametrize("name", ["wikitext2", "lambada", "openwebtext-split"])
def test_hub_dataset_offline_fails_fast(tmp_path, gpt2, name, no_network):
    cfg = data_cfg(name, tmp_path)
    with pytest.raises(DataUnavailableError) as err:
        get_dataset(cfg, gpt2, "validation", L)
    assert no_network == []  # fails without a connection attempt (nothing to wait on)
    message = str(err.value)
    assert f"'{cfg.valid}'" in message and "OFFLINE=1" in message
    assert "data.cache_dir" in message and "\n" not in message


def test_hub_source_runs_through_the_same_pipeline(tmp_path, gpt2, monkeypatch):
    calls = []

    def fake_load_dataset(path, config=None, split=None, **kwargs):
        calls.append((path, config, split))
        sentences = ["the company 's shares rose N %", "he did n't say"] * 50
        return data_sources.datasets.Dataset.from_dict({"sentence": sentences, "id": [0] * 100})

    monkeypatch.setattr(data_sources.datasets, "load_dataset", fake_load_dataset)
    cfg = data_cfg("ptb", tmp_path, wrap=False)
    rows = get_dataset(cfg, gpt2, "validation", 16)
    assert calls == [("ptb-text-only/ptb_text_only", "penn_treebank", "validation")]
    expected = gpt2("the company's shares rose 1 %", add_special_tokens=False)["input_ids"]
    n = len(expected)
    assert rows[0]["input_ids"][1 : n + 1].tolist() == expected  # detokenized first
    get_dataset(cfg, gpt2, "validation", 16)
    assert len(calls) == 1  # the processed copy is served from data.cache_dir


def test_text8_source_split_and_rows(monkeypatch):
    text = "".join("abcdefghij"[i % 10] for i in range(100_000))

    def fake_load_dataset(path, **kwargs):
        return data_sources.datasets.Dataset.from_dict({"text": [text]})

    monkeypatch.setattr(data_sources.datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data_sources, "TEXT8_SPLITS", (90_000, 95_000))
    cfg = OmegaConf.load(CONFIGS / "text8.yaml")
    train = data_sources.SOURCES["text8"].load(cfg, "train")["text"]
    valid = data_sources.SOURCES["text8"].load(cfg, "validation")["text"]
    assert "".join(train) == text[:90_000] and "".join(valid) == text[95_000:]
    assert cfg.insert_train_eos is False and cfg.insert_valid_eos is False


def test_unreachable_host_fails_fast(tmp_path, gpt2, monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(data_sources, "host_reachable", lambda host, timeout=3.0: False)
    with pytest.raises(DataUnavailableError, match="ptb.*unreachable"):
        get_dataset(data_cfg("ptb", tmp_path), gpt2, "train", L)
    assert no_network == []  # the one probe said "unreachable": nothing else was tried


def test_every_config_resolves():
    names = sorted(path.stem for path in CONFIGS.glob("*.yaml"))
    assert {"bible", "bible-gpt2", "local_text", "wikitext2", "text8", "lm1b"} <= set(names)
    for name in names:
        cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
        assert cfg.name == name and cfg.streaming is False
        name_or_path = cfg.tokenizer_name_or_path
        if grid_data.is_grid_data(cfg):  # checkerboard, images: data/grid.py, GridTokenizer
            assert cfg.train in grid_data.SOURCES and cfg.valid in grid_data.SOURCES
            assert name_or_path.startswith("grid-") and len(get_tokenizer(cfg)) > 1
            continue
        assert cfg.train in data_sources.SOURCES and cfg.valid in data_sources.SOURCES
        assert name_or_path in tokenization.NAMED_TOKENIZERS or name_or_path.startswith("bpe-")
        assert "vadd" in OmegaConf.to_container(cfg, resolve=True)["cache_dir"]


# ---------------------------------------------------------------- detokenizers


def test_wikitext_detokenizer():
    text = (
        " = = Early life = = \n The 1 @,@ 000 @-@ year war ( 1914 @.@ 5 ) was n't over , he said . "
    )
    assert detokenizers.wikitext(text) == (
        " == Early life ==\nThe 1,000-year war (1914.5) was n't over, he said. "
    )


def test_ptb_detokenizer():
    text = "the company 's <unk> did n't pay $ N million or N N shares \\/ year"
    assert detokenizers.ptb(text) == ("the company's ? didn't pay $1 million or 1 1 shares / year")


def test_lm1b_detokenizer():
    text = 'He said " it is ( very ) good , really " and left . See http : / / x.com ?'
    expected = 'He said "it is (very) good, really" and left. See http://x.com?'
    assert detokenizers.lm1b(text) == expected


def test_lambada_and_scientific_papers_detokenizers():
    assert detokenizers.lambada("\u201cYes,\u201d she said. ") == '\n"Yes," she said.'
    assert detokenizers.scientific_papers("a @xmath0 b , c ( d )") == "a @xmath0 b, c (d)"


# ---------------------------------------------------------------- damaged caches, odd files


def test_a_damaged_tokenizer_or_rows_cache_is_rebuilt_with_a_message(tmp_path, capsys):
    write_corpus(tmp_path / "corpus")
    cfg = data_cfg("local_text", tmp_path / "cache", path=str(tmp_path / "corpus"))
    tok = get_tokenizer(cfg)
    rows = [r.tolist() for r in get_dataset(cfg, tok, "train", 16)["input_ids"]]
    (tokenizer_file,) = (tmp_path / "cache" / "tokenizers").iterdir()
    good = tokenizer_file.read_bytes()
    tokenizer_file.write_bytes(good[: len(good) // 3])  # a copy cut short
    (folder,) = [p for p in (tmp_path / "cache" / "datasets").iterdir() if "_train_" in p.name]
    (arrow,) = folder.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    capsys.readouterr()
    again = get_tokenizer(cfg)
    assert "cached tokenizer" in capsys.readouterr().out and tokenizer_file.read_bytes() == good
    assert [r.tolist() for r in get_dataset(cfg, again, "train", 16)["input_ids"]] == rows
    assert "cached rows" in capsys.readouterr().out


def test_rows_cache_with_fewer_rows_than_written_is_rebuilt(tmp_path, capsys):
    write_corpus(tmp_path / "corpus")
    cfg = data_cfg("local_text", tmp_path / "cache", path=str(tmp_path / "corpus"))
    tok = get_tokenizer(cfg)
    n = len(get_dataset(cfg, tok, "train", 16))
    (folder,) = [p for p in (tmp_path / "cache" / "datasets").iterdir() if "_train_" in p.name]
    (folder / dataloader.ROWS_FILE).write_text(json.dumps({"rows": n + 5}))  # rows went missing
    assert len(get_dataset(cfg, tok, "train", 16)) == n
    assert "cached rows" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"a", b"\n", b" "])
def test_a_one_byte_file_is_one_line(tmp_path, gpt2, content):
    (tmp_path / "tiny.txt").write_bytes(content)
    cfg = data_cfg("local_text", tmp_path / "cache", path=str(tmp_path / "tiny.txt"))
    with pytest.raises(DataUnavailableError) as err:
        get_dataset(cfg, gpt2, "train", 16)
    assert "\n" not in str(err.value)
    assert "no text" in str(err.value) or "gives no row of model.length=16" in str(err.value)


def test_a_huge_line_is_tokenised_in_pieces_with_the_same_ids(gpt2, monkeypatch):
    words = " ".join(f"w{i % 97}x{i % 13}" for i in range(3000)) + "  double  spaces\tand tabs"
    whole = gpt2(words, add_special_tokens=False)["input_ids"]
    calls = []
    encode = type(gpt2).__call__

    def spy(self, text, **kwargs):
        calls.append(len(text) if isinstance(text, str) else sum(map(len, text)))
        return encode(self, text, **kwargs)

    monkeypatch.setattr(dataloader, "PIECE_CHARS", 1000)
    monkeypatch.setattr(type(gpt2), "__call__", spy)
    flat, lengths = dataloader._encode(gpt2, ["short one", words])
    assert flat[lengths[0] :].tolist() == whole  # the same ids as one call
    assert len(calls) > 10 and max(calls) <= 1000  # never more than a piece at once


def test_the_no_network_guard_records_and_refuses_a_connection(no_network):
    import socket

    with pytest.raises(OSError, match="no network in this test"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: never routed
    assert no_network == [("192.0.2.1", 80)]
