"""Tests of generative perplexity: the offline judge, the scoring protocol, the caches.

The judge is SmolLM2-135M (the `smollm2` alias). It is loaded once for the module from the
default cache folder, so the ~30 s GGUF conversion happens once per machine; every test
keeps its forward passes few and short because a CPU forward is the cost here.
"""

import dataclasses
import math
import random

import pytest
import torch

from errors import VaddError
from evaluation import gen_ppl

GENESIS = (
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep."
)
VERSES = [
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
    "And God called the light Day, and the darkness he called Night.",
    "And the evening and the morning were the first day.",
    "And God said, Let there be a firmament in the midst of the waters.",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def judge() -> gen_ppl.Judge:
    # Default cache dir on purpose: one conversion per machine, not one per test session.
    return gen_ppl.load_judge("smollm2")


def judge_tokens(judge: gen_ppl.Judge, text: str) -> list[int]:
    return judge.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- the judge


def test_real_text_scores_far_below_shuffled_words(judge):
    words = GENESIS.split()
    random.Random(0).shuffle(words)
    result = gen_ppl.generative_perplexity([GENESIS, " ".join(words)], judge)
    real, shuffled = result["per_sample_ppl"]
    assert real < 30, real
    assert shuffled > 10 * real, (real, shuffled)
    assert result["judge"] == "smollm2" and result["num_samples"] == 2
    # The first word is scored after the document separator, not the chat marker BOS.
    assert result["start_token"] == "<|endoftext|>"


def test_load_judge_is_cached_per_process_and_on_disk(judge, monkeypatch):
    def no_load(*_):
        raise AssertionError("the judge was loaded again in the same process")

    monkeypatch.setattr(gen_ppl, "_load", no_load)
    again = gen_ppl.load_judge("smollm2")
    assert again is judge
    cached = gen_ppl.judge_cache_dir("smollm2")
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    assert judge.context == 8192 and not judge.model.training


def test_converted_judge_reloads_from_disk_cache(judge, tmp_path, monkeypatch):
    monkeypatch.setenv("VADD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gen_ppl, "_JUDGES", {})  # a fresh process, as far as loading goes
    gen_ppl.save_judge(judge.model, judge.tokenizer, gen_ppl.judge_cache_dir("smollm2"))
    assert [p.name for p in (tmp_path / "judges").iterdir()] == ["smollm2"]  # no partial copy

    def no_conversion():
        raise AssertionError("the GGUF was converted again despite the disk cache")

    monkeypatch.setattr(gen_ppl, "_smollm2_folder", no_conversion)
    reloaded = gen_ppl.load_judge("smollm2")  # from the disk cache (no_conversion above)
    assert reloaded is not judge
    original = judge.model.state_dict()
    for name, tensor in reloaded.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert reloaded.start_id == judge.start_id


class _FakeModel:
    def save_pretrained(self, folder):
        (folder / "model.safetensors").write_text("weights")


class _FailingTokenizer:
    def save_pretrained(self, folder):
        raise RuntimeError("interrupted")


class _FakeTokenizer:
    def save_pretrained(self, folder):
        (folder / "tokenizer.json").write_text("{}")


def test_interrupted_save_leaves_no_half_copy(tmp_path):
    target = tmp_path / "judges" / "smollm2"
    with pytest.raises(RuntimeError, match="interrupted"):
        gen_ppl.save_judge(_FakeModel(), _FailingTokenizer(), target)
    assert list(target.parent.iterdir()) == []
    # A process that loses the race to another one keeps the winner's complete copy.
    gen_ppl.save_judge(_FakeModel(), _FakeTokenizer(), target)
    gen_ppl.save_judge(_FakeModel(), _FakeTokenizer(), target)
    assert [p.name for p in target.parent.iterdir()] == ["smollm2"]
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "tokenizer.json"]


def test_unknown_hub_judge_offline_fails_fast_naming_it(no_network):
    with pytest.raises(VaddError, match="vadd-test/no-such-judge") as info:
        gen_ppl.load_judge("vadd-test/no-such-judge")
    assert no_network == []  # offline: refused without trying the hub
    message = str(info.value)
    assert "\n" not in message and "smollm2" in message  # one line that names a fix


def test_missing_local_judge_folder_is_a_vadd_error(tmp_path):
    with pytest.raises(VaddError, match="does not exist"):
        gen_ppl.load_judge(str(tmp_path / "absent"))


# ---------------------------------------------------------------- the protocol


def test_every_sample_and_token_counted(judge):
    result = gen_ppl.generative_perplexity(VERSES, judge, batch_size=2)  # 5 = 2 + 2 + 1
    lengths = [len(judge_tokens(judge, text)) for text in VERSES]
    assert result["num_samples"] == 5 and result["num_empty"] == 0
    assert result["per_sample_tokens"] == lengths
    assert result["num_tokens"] == sum(lengths)
    nll, tokens = result["per_sample_nll"], result["per_sample_tokens"]
    assert result["gen_ppl"] == pytest.approx(math.exp(sum(nll) / sum(tokens)), rel=1e-9)
    expected = [math.exp(n / t) for n, t in zip(nll, tokens, strict=True)]
    assert result["per_sample_ppl"] == pytest.approx(expected, rel=1e-9)
    assert result["mean_per_sample_ppl"] == pytest.approx(sum(expected) / 5, rel=1e-9)
    # The two longest samples' NLLs recomputed one at a time, without batch or padding (in
    # one batch the shorter is padded): -sum log p(token j | the document separator, tokens
    # < j) under the judge. Two only: a CPU forward of the judge is the cost here.
    start = judge.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert lengths[1] > lengths[4] > max(lengths[0], lengths[2], lengths[3])
    for i in (1, 4):
        text, got = VERSES[i], nll[i]
        x = torch.tensor([[start, *judge_tokens(judge, text)]])
        with torch.inference_mode():
            logits = judge.model(input_ids=x).logits[0, :-1].float()
        want = float((logits.logsumexp(-1) - logits.gather(1, x[0, 1:, None])[:, 0]).sum())
        assert got == pytest.approx(want, rel=1e-4)


def test_batch_size_does_not_change_result(judge):
    texts = [VERSES[0], GENESIS, VERSES[3]]  # unequal lengths: padding in the batch of 4
    one = gen_ppl.generative_perplexity(texts, judge, batch_size=1)
    four = gen_ppl.generative_perplexity(texts, judge, batch_size=4)
    assert four["gen_ppl"] == pytest.approx(one["gen_ppl"], rel=1e-4)
    assert four["per_sample_ppl"] == pytest.approx(one["per_sample_ppl"], rel=1e-4)
    assert four["num_tokens"] == one["num_tokens"]


def test_empty_texts_are_skipped_and_reported(judge):
    result = gen_ppl.generative_perplexity(["", "", ""], judge)
    assert result["num_samples"] == 0 and result["num_empty"] == 3
    assert result["empty_indices"] == [0, 1, 2] and result["per_sample_ppl"] == []
    assert math.isnan(result["gen_ppl"])


def test_long_text_is_chunked_and_every_token_scored(judge):
    text = " ".join([GENESIS] + VERSES[:2])
    ids = judge_tokens(judge, text)
    short = dataclasses.replace(judge, context=16)
    chunks, owners = gen_ppl._chunk([ids], short)
    assert len(chunks) == math.ceil(len(ids) / 15) and set(owners) == {0}
    assert all(len(chunk) <= 16 and chunk[0] == judge.start_id for chunk in chunks)
    assert [t for chunk in chunks for t in chunk[1:]] == ids

    chunked = gen_ppl.generative_perplexity([text], short, batch_size=8)
    whole = gen_ppl.generative_perplexity([text], judge)
    assert chunked["num_tokens"] == whole["num_tokens"] == len(ids)
    # Each chunk restarts the context, so the judge sees less of the text: higher PPL.
    assert chunked["gen_ppl"] > whole["gen_ppl"]


def test_chunks_without_a_start_token_skip_only_unpredictable_tokens(judge):
    bare = dataclasses.replace(judge, context=4, start_id=None)
    chunks, _ = gen_ppl._chunk([list(range(10)), [7]], bare)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # the lone [7] has no target


def test_text_after_eos_is_not_scored(judge):
    tok = judge.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    garbage = judge_tokens(judge, " zebra quantum zebra the of of of ;;;")
    sample = [bos] + judge_tokens(judge, GENESIS) + [eos] + garbage + [eos]
    (truncated,) = gen_ppl.truncate_at_eos([sample], eos_id=eos, bos_id=bos)
    assert truncated == judge_tokens(judge, GENESIS)

    texts = [
        tok.decode(truncated),
        GENESIS,
        tok.decode(sample, skip_special_tokens=True),  # what scoring without the cut sees
    ]
    result = gen_ppl.generative_perplexity(texts, judge)
    cut, reference, uncut = result["per_sample_ppl"]
    assert cut == pytest.approx(reference, rel=1e-6)
    assert result["per_sample_tokens"][0] == result["per_sample_tokens"][1]
    assert result["per_sample_tokens"][2] > result["per_sample_tokens"][0]
    assert uncut != pytest.approx(cut, rel=1e-3)


# ---------------------------------------------------------------- pure helpers


def test_truncate_at_eos_cases():
    # GPT-2: BOS and EOS share one id; the opening one is BOS, the next ends the sample.
    assert gen_ppl.truncate_at_eos([[9, 1, 2, 9, 3, 9]], eos_id=9, bos_id=9) == [[1, 2]]
    assert gen_ppl.truncate_at_eos([[1, 2, 3]], eos_id=9, bos_id=8) == [[1, 2, 3]]
    assert gen_ppl.truncate_at_eos([[1, 8, 2]], eos_id=9, bos_id=8) == [[1, 8, 2]]  # only leading
    assert gen_ppl.truncate_at_eos([[9, 1], [2, 3]], eos_id=9, bos_id=None) == [[], [2, 3]]
    rows = torch.tensor([[8, 1, 9, 2], [8, 3, 4, 5]])
    assert gen_ppl.truncate_at_eos(rows, eos_id=9, bos_id=8) == [[1], [3, 4, 5]]


def test_unigram_entropy():
    assert gen_ppl.unigram_entropy([[5] * 10]) == 0.0
    assert gen_ppl.unigram_entropy([list(range(7))]) == pytest.approx(math.log(7))
    # Mean over samples, empty samples skipped: (0 + log 2) / 2.
    assert gen_ppl.unigram_entropy([[1, 1], [1, 2], []]) == pytest.approx(math.log(2) / 2)
    assert gen_ppl.unigram_entropy(torch.tensor([[3, 3, 4, 4]])) == pytest.approx(math.log(2))


def test_distinct_texts_are_scored_once_and_a_set_counts_its_repeats(judge):
    """distinct_text_scores + corpus_gen_ppl (scripts/verse_set.py): a sample set's
    gen-PPL is the number generative_perplexity gives it, repeats weighing, empties skipped."""
    cell = [VERSES[0], VERSES[0], "", VERSES[3], VERSES[0]]
    scores = gen_ppl.distinct_text_scores([VERSES[3], VERSES[0], "", VERSES[1]], judge)
    assert set(scores) == {VERSES[0], VERSES[1], VERSES[3]}
    alone = gen_ppl.generative_perplexity(cell, judge)
    assert gen_ppl.corpus_gen_ppl(cell, scores) == pytest.approx(alone["gen_ppl"], rel=1e-4)
    unweighted = gen_ppl.generative_perplexity([VERSES[0], VERSES[3]], judge)["gen_ppl"]
    assert gen_ppl.corpus_gen_ppl(cell, scores) != pytest.approx(unweighted, rel=1e-3)
    assert math.isnan(gen_ppl.corpus_gen_ppl(["", ""], scores))


def test_verse_set_judges_the_first_k_samples_of_a_cell_and_counts_entropy_over_all(
    judge, monkeypatch
):
    """scripts/verse_set.py's judge_all: gen-PPL of each cell over its first
    --judge-samples texts only (the judge is the script's cost), word entropy over all."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "verse_set.py"
    spec = importlib.util.spec_from_file_location("verse_set_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cell = [VERSES[0], VERSES[1], "light light light light", "darkness was upon"]
    other = [cell[2]]  # judged for this cell: the first cell must still leave it out
    runs = [{"seed": 1, "members": VERSES[:2], "texts": {"MDLM|1": cell, "MDLM|2": other}}]
    judged, score = [], gen_ppl.distinct_text_scores
    monkeypatch.setattr(
        gen_ppl, "distinct_text_scores", lambda t, *a, **k: judged.extend(t) or score(t, *a, **k)
    )
    scores, truth = script.judge_all(runs, "smollm2", judge_samples=2)
    assert set(judged) == {*cell[:3]}  # the 4th text is in no cell's first two: never judged
    first_two = gen_ppl.generative_perplexity(cell[:2], judge)["gen_ppl"]
    assert scores[(1, "MDLM|1")]["gen_ppl"] == pytest.approx(first_two, rel=1e-4)
    assert scores[(1, "MDLM|1")]["unigram_entropy"] == pytest.approx(
        gen_ppl.unigram_entropy([t.split() for t in cell])
    )  # every text of the cell, the 3rd and 4th too
    assert truth["gen_ppl"] == pytest.approx(first_two, rel=1e-4)  # members = the first two
    everything, _ = script.judge_all(runs, "smollm2", judge_samples=3)
    assert everything[(1, "MDLM|1")]["gen_ppl"] != pytest.approx(first_two, rel=1e-3)
