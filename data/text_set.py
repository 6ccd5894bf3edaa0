"""A finite set of text sequences whose distribution is known exactly (data.kind=set).

The text analogue of the checkerboard (`data=verse_set`): N distinct token sequences of
model.length tokens, each BOS and then the first L - 1 tokens of a KJV verse under the
data config's tokenizer (the embedded default's BPE), and the data distribution is
uniform over them.
Because the truth is known, samples can be scored exactly:

- precision: the fraction of samples that are members of the set;
- coverage: the fraction of the N members found among the samples, beside the coverage
  that S exact draws from the uniform distribution reach on average, N (1 - (1 - 1/N)^S);
- the true entropy log N per sequence (the NLL a perfect model reaches: no bound can be
  below it);
- what a perfect MDLM reaches with the same sampler (`oracle_denoiser`: the exact
  p(x0 | xt) of the set): a masked-diffusion step reveals its positions independently,
  so even exact conditionals leave the set when two correlated positions are revealed
  in one step; that precision at T steps is the bound MDLM's samples can approach.

Why it shows few-step correlation: a T = 1 masked-diffusion step reveals all L positions
at once, independently given xt, so MDLM draws from the product of the positions'
marginals and almost never lands on a member; VADD's decoder is factorised given z, and
a z that names the member makes the one-step product exact.

Why BOS opens every row, and the samplers are given it (`sampling_frame`): the DiT
knows positions only through rotary attention, which is relative. From an all-[MASK]
input every position computes the same thing (identical values, whatever the attention
weights), so a T = 1 step would draw every position from one shared marginal for any
model, z or not; a fixed token at position 0 tells each position where it is, as BOS
does for unwrapped text data. Rows have no EOS and no padding. The training split
repeats the set `repeats` times (so an epoch shows every member equally often), the
validation split is the set once.
"""

import math
import random

import torch
from omegaconf import DictConfig

from data import sources as data_sources
from data.grid import TokenRows


def members(data_cfg: DictConfig, tokenizer, length: int) -> torch.Tensor:
    """The N member sequences (N, length), in a fixed order given data.seed.

    Verses with at least `length` - 1 tokens (no special tokens) give BOS and their first
    `length` - 1 tokens; duplicates are dropped; a seeded draw picks data.num_sequences."""
    texts = [verse["text"] for verse in data_sources.bible_verses()]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    keep, bos = length - 1, tokenizer.bos_token_id
    unique = sorted({(bos, *row[:keep]) for row in ids if len(row) >= keep})
    n = int(data_cfg.num_sequences)
    if n > len(unique):
        raise data_sources.DataUnavailableError(
            f"data.num_sequences={n} but only {len(unique)} distinct verse openings have "
            f"{keep} tokens: lower data.num_sequences or model.length"
        )
    chosen = random.Random(int(data_cfg.seed)).sample(unique, n)
    return torch.tensor(chosen, dtype=torch.long)


def get_dataset(data_cfg: DictConfig, tokenizer, split: str, length: int) -> TokenRows:
    rows = members(data_cfg, tokenizer, length)
    if split == "train":
        rows = rows.repeat(int(data_cfg.repeats), 1)
    return TokenRows(rows)


def sampling_frame(tokenizer, length: int, mask_id: int) -> torch.Tensor:
    """The row (L,) the samplers start from: BOS given at position 0, the rest free."""
    row = torch.full((length,), mask_id, dtype=torch.long)
    row[0] = tokenizer.bos_token_id
    return row


def oracle_denoiser(member_rows: torch.Tensor, mask_id: int, vocab_size: int):
    """samplers.DenoiseFn of the exact posterior under the uniform set: at each masked
    position, the token counts among the members that agree with every visible token
    of xt, as logits (log counts; -inf for tokens no such member has). A row that no
    member explains (the sampler has left the set already) gets the set's marginals."""

    def denoise(xt, sigma, z, out_mask):  # xt, out_mask (B, L) -> (positions P, V)
        rows = member_rows.to(xt.device)
        visible = xt != mask_id
        agree = (rows[None] == xt[:, None]) | ~visible[:, None]  # (B, N, L)
        consistent = agree.all(-1).float()  # (B, N)
        explained = consistent.sum(-1, keepdim=True) > 0
        weights = torch.where(explained, consistent, torch.ones_like(consistent))
        b, pos = out_mask.nonzero(as_tuple=True)
        tokens = rows[:, pos].T  # (P, N): each member's token at each asked position
        counts = torch.zeros(len(b), vocab_size, device=xt.device)
        counts.scatter_add_(1, tokens, weights[b])
        return counts.log()

    return denoise


def exact_mdlm_scores(cfg: DictConfig, sample_steps: list[int], num_samples: int) -> dict:
    """str(T) -> set_scores of MDLM's sampler (`ddpm`: samplers.sample_masked, the run's
    schedule, eps and noise removal) with oracle_denoiser: a perfect MDLM at T steps."""
    from data.tokenization import Vocab
    from dataloader import get_tokenizer
    from noise_schedule import get_noise
    from sampling import samplers

    tokenizer = get_tokenizer(cfg.data)
    vocab, length = Vocab.from_tokenizer(tokenizer), int(cfg.model.length)
    rows = members(cfg.data, tokenizer, length)
    frame = sampling_frame(tokenizer, length, vocab.mask_id)
    oracle = oracle_denoiser(rows, vocab.mask_id, vocab.size)
    scores = {}
    for steps in sample_steps:
        x, _ = samplers.sample_masked(
            oracle, frame.expand(num_samples, -1).clone(), mask_id=vocab.mask_id,
            vocab_size=vocab.size, noise=get_noise(cfg.noise), steps=steps,
            eps=float(cfg.sampling.eps), noise_removal=bool(cfg.sampling.noise_removal),
            generator=torch.Generator().manual_seed(steps),
        )  # fmt: skip
        scores[str(steps)] = set_scores(x, rows)
    return scores


def expected_coverage(num_members: int, num_samples: int) -> float:
    """Mean fraction of N equally likely members seen in S independent exact draws."""
    if num_members == 0:
        return 0.0
    return 1.0 - (1.0 - 1.0 / num_members) ** num_samples


def set_scores(samples: torch.Tensor, member_rows: torch.Tensor) -> dict:
    """Exact scores of sampled rows (S, L) against the set (N, L)."""
    known = {tuple(row) for row in member_rows.tolist()}
    hits = [tuple(row) in known for row in samples.tolist()]
    found = {tuple(row) for row, hit in zip(samples.tolist(), hits, strict=True) if hit}
    n, s = len(known), len(hits)
    return {
        "precision": sum(hits) / s if s else 0.0,
        "coverage": len(found) / n if n else 0.0,
        "coverage_of_exact_draws": expected_coverage(n, s),
        "distinct_members_found": len(found),
        "num_members": n,
        "true_entropy_nats_per_sequence": math.log(n) if n else 0.0,
    }


def score_samples(data_cfg: DictConfig, tokens: torch.Tensor, tokenizer) -> dict:
    """sample_eval's report for data.kind=set."""
    if len(tokens) == 0:
        return {}
    return set_scores(tokens, members(data_cfg, tokenizer, tokens.shape[1]))
