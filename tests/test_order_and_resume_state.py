"""Unit tests of the resumable data order (data/order.py) and of the exact-resume state a
training checkpoint carries (checkpointing/resume_state.py): pure, in-process, fast.

Expectations are computed independently of the code under test: the permutation from
the documented (seed, epoch) generator, the shards and block layout by plain list
slicing, lengths and messages written out by hand. Ranks and world sizes are faked by
monkeypatching `utils.rank_world` (order.py reads it through the `utils` module).
"""

import random

import numpy as np
import pytest
import torch

import utils
from checkpointing import resume_state
from data.order import ResumableSampler
from errors import CheckpointError


def permutation(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch `epoch`: a permutation drawn from (seed, epoch) alone."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_rows, generator=gen).tolist()


def as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(utils, "rank_world", lambda: (rank, world))


def sampler(num_rows=24, *, seed=7, shuffle=True, drop_last=True, **kw) -> ResumableSampler:
    return ResumableSampler(num_rows, seed=seed, shuffle=shuffle, drop_last=drop_last, **kw)


# ---------------------------------------------------------------- data/order.py: order
def test_a_new_sampler_reads_epoch_0_of_its_seed_from_the_start():
    s = sampler(24, seed=7)
    # the position is an int from the start (`shard[None:]` would read the same rows, but
    # the documented state is "rows consumed", 0 for a fresh sampler, as after a pass)
    assert (s.epoch, s.start) == (0, 0) and type(s.start) is int
    assert list(s) == permutation(24, 7, 0)
    assert list(sampler(24, seed=7, drop_last=False)) == permutation(24, 7, 0)


@pytest.mark.parametrize("seed,epoch", [(0, 0), (0, 1), (3, 2), (11, 5)])
def test_shuffle_is_the_permutation_of_seed_and_epoch(seed, epoch):
    s = sampler(30, seed=seed, drop_last=False)
    s.set_epoch(epoch)
    got = list(s)
    assert got == permutation(30, seed, epoch)
    assert sorted(got) == list(range(30))


def test_shuffle_differs_across_epochs_and_seeds_and_repeats_for_the_same_pair():
    def order(seed, epoch):
        s = sampler(40, seed=seed, drop_last=False)
        s.set_epoch(epoch)
        return list(s)

    orders = {(seed, epoch): order(seed, epoch) for seed in (0, 1, 2) for epoch in (0, 1, 2)}
    assert len({tuple(o) for o in orders.values()}) == len(orders)  # all nine differ
    assert all(sorted(o) == list(range(40)) for o in orders.values())
    assert order(1, 2) == orders[(1, 2)]  # another sampler, the same (seed, epoch)
    assert orders[(0, 0)] != list(range(40))  # shuffled at all


def test_shuffle_neither_reads_nor_moves_the_global_rng():
    torch.manual_seed(0)
    first = list(sampler(50, seed=4))
    state = torch.get_rng_state()
    torch.manual_seed(12345)  # another global state: the order does not depend on it
    second = list(sampler(50, seed=4))
    assert first == second
    torch.set_rng_state(state)
    list(sampler(50, seed=4))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("drop_last", [False, True])
def test_without_shuffle_rows_come_in_their_order_every_epoch(drop_last):
    s = sampler(12, shuffle=False, drop_last=drop_last, batch_size=4)
    assert list(s) == list(range(12))
    s.set_epoch(3)
    assert list(s) == list(range(12))


# ---------------------------------------------------------------- drop_last: block layout
def blocks(order: list[int], world: int, batch: int) -> list[list[int]]:
    """Expected shard of every rank: block k = rows [k*world*batch, (k+1)*world*batch) of
    the epoch's order; rank r reads its r-th batch. The last partial block is dropped."""
    n_blocks = len(order) // (world * batch)
    return [
        [order[k * world * batch + r * batch + j] for k in range(n_blocks) for j in range(batch)]
        for r in range(world)
    ]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("shuffle", [True, False])
def test_drop_last_shards_are_batches_of_global_blocks(world, batch, shuffle, monkeypatch):
    num_rows = 50  # not a multiple of world*batch for most pairs: a partial block to drop
    base = permutation(num_rows, 9, 2) if shuffle else list(range(num_rows))
    want = blocks(base, world, batch)
    shards = []
    for rank in range(world):
        as_rank(monkeypatch, rank, world)
        s = sampler(num_rows, seed=9, shuffle=shuffle, batch_size=batch)
        s.set_epoch(2)
        shards.append(list(s))
        assert shards[-1] == want[rank], rank
        assert len(s) == num_rows // (world * batch) * batch
    # global row i (of the epoch's order) lands at position i of the global batch
    steps = len(shards[0]) // batch
    rebuilt = [
        row
        for step in range(steps)
        for shard in shards
        for row in shard[step * batch : (step + 1) * batch]
    ]
    kept = num_rows - num_rows % (world * batch)
    assert rebuilt == base[:kept]
    assert len(set(rebuilt)) == kept  # no row twice


def test_drop_last_layout_by_hand(monkeypatch):
    # 14 rows, world 2, batch 3: blocks [0..5], [6..11]; rows 12, 13 dropped
    as_rank(monkeypatch, 0, 2)
    assert list(sampler(14, shuffle=False, batch_size=3)) == [0, 1, 2, 6, 7, 8]
    as_rank(monkeypatch, 1, 2)
    assert list(sampler(14, shuffle=False, batch_size=3)) == [3, 4, 5, 9, 10, 11]


def test_drop_last_defaults_to_batches_of_one_row(monkeypatch):
    as_rank(monkeypatch, 1, 2)
    s = ResumableSampler(7, seed=0, shuffle=False, drop_last=True)
    assert list(s) == [1, 3, 5]
    assert len(s) == 3


def test_drop_last_with_fewer_rows_than_a_block_reads_nothing(monkeypatch):
    as_rank(monkeypatch, 0, 2)
    s = sampler(5, batch_size=3)
    assert list(s) == []
    assert len(s) == 0


# ---------------------------------------------------------------- evaluation: every world-th row
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [True, False])
def test_without_drop_last_rank_r_reads_every_world_th_row(world, shuffle, monkeypatch):
    num_rows = 10
    base = permutation(num_rows, 5, 1) if shuffle else list(range(num_rows))
    seen = []
    for rank in range(world):
        as_rank(monkeypatch, rank, world)
        s = sampler(num_rows, seed=5, shuffle=shuffle, drop_last=False, batch_size=4)
        s.set_epoch(1)
        got = list(s)
        assert got == base[rank::world]  # batch_size plays no part
        assert len(s) == len(got)
        seen += got
    assert sorted(seen) == list(range(num_rows))  # every row once: no padding


def test_without_drop_last_shards_are_uneven_not_padded(monkeypatch):
    lengths = {}
    for rank in range(4):
        as_rank(monkeypatch, rank, 4)
        s = sampler(10, shuffle=False, drop_last=False)
        lengths[rank] = (len(s), list(s))
    assert lengths == {0: (3, [0, 4, 8]), 1: (3, [1, 5, 9]), 2: (2, [2, 6]), 3: (2, [3, 7])}


@pytest.mark.parametrize(
    "num_rows,world,batch,expected",
    [(24, 1, 1, 24), (24, 2, 4, 12), (23, 2, 3, 9), (50, 4, 3, 12), (7, 2, 4, 0), (48, 4, 4, 12)],
)
def test_len_with_drop_last_is_whole_blocks_times_batch(
    num_rows, world, batch, expected, monkeypatch
):
    for rank in range(world):
        as_rank(monkeypatch, rank, world)
        assert len(sampler(num_rows, batch_size=batch)) == expected


@pytest.mark.parametrize(
    "num_rows,world,expected",
    [(10, 1, [10]), (10, 3, [4, 3, 3]), (11, 4, [3, 3, 3, 2]), (2, 4, [1, 1, 0, 0])],
)
def test_len_without_drop_last_is_the_uneven_shard(num_rows, world, expected, monkeypatch):
    for rank in range(world):
        as_rank(monkeypatch, rank, world)
        s = sampler(num_rows, drop_last=False, batch_size=3)
        assert len(s) == expected[rank]
        assert len(list(s)) == expected[rank]


# ---------------------------------------------------------------- position inside an epoch
def test_iteration_starts_at_start_then_the_next_pass_at_zero():
    s = sampler(20, seed=2, batch_size=2)
    s.set_epoch(1)
    full = permutation(20, 2, 1)
    s.start = 6
    assert list(s) == full[6:]
    assert s.start == 0
    assert list(s) == full  # the position applies to one pass only
    s.set_epoch(2)
    assert list(s) == permutation(20, 2, 2)


def test_the_position_is_read_when_iteration_starts():
    s = sampler(20, seed=2)
    it = iter(s)
    assert s.start == 0
    assert list(it) == permutation(20, 2, 0)
    s.load_state_dict({"epoch": 0, "start": 3, "seed": 2})
    it = iter(s)
    s.start = 9  # changed after the iterator was made: not this pass
    assert list(it) == permutation(20, 2, 0)[3:]


def test_the_position_counts_rows_of_this_ranks_shard(monkeypatch):
    as_rank(monkeypatch, 1, 2)
    s = sampler(24, seed=3, batch_size=2)
    s.load_state_dict({"epoch": 4, "start": 4})
    want = blocks(permutation(24, 3, 4), 2, 2)[1]
    assert list(s) == want[4:]


def test_state_dict_holds_epoch_consumed_rows_and_seed():
    s = sampler(20, seed=13)
    layout = {"world": 1, "batch_size": 1}  # processes x rows per micro-batch
    assert s.state_dict(consumed=0) == {"epoch": 0, "start": 0, "seed": 13, **layout}
    s.set_epoch(5)
    s.start = 2  # not what is saved: the caller says how many rows its steps consumed
    assert s.state_dict(consumed=8) == {"epoch": 5, "start": 8, "seed": 13, **layout}


def test_state_round_trip_resumes_the_interrupted_pass():
    s = sampler(30, seed=6, batch_size=3)
    s.set_epoch(2)
    full = list(s)
    state = s.state_dict(consumed=9)
    other = sampler(30, seed=6, batch_size=3)
    other.load_state_dict(state)
    assert (other.epoch, other.start) == (2, 9)
    assert list(other) == full[9:]
    assert list(other) == full


@pytest.mark.parametrize("kind", [torch.tensor, np.int64, float])
def test_load_state_dict_converts_to_plain_ints(kind):
    s = sampler(20, seed=1)
    s.load_state_dict({"epoch": kind(3), "start": kind(5), "seed": 1})
    assert type(s.epoch) is int and type(s.start) is int
    assert (s.epoch, s.start) == (3, 5)
    assert s.state_dict(consumed=5) == {"epoch": 3, "start": 5, "seed": 1, "world": 1,
                                        "batch_size": 1}  # fmt: skip
    assert list(s) == permutation(20, 1, 3)[5:]


def test_load_state_dict_refuses_another_seed_whose_order_it_cannot_continue():
    s = sampler(20, seed=1)
    with pytest.raises(CheckpointError, match=r"order of seed=99, this run's seed is 1") as err:
        s.load_state_dict({"epoch": 0, "start": 4, "seed": 99})
    assert "\n" not in str(err.value) and (s.seed, s.start) == (1, 0)


@pytest.mark.parametrize(
    "then,now", [((1, 4), (2, 2)), ((2, 2), (1, 4)), ((2, 4), (4, 2)), ((4, 1), (2, 1))]
)  # (processes, rows per micro-batch) of the checkpoint, and of the resume
def test_a_resume_on_another_layout_reads_on_from_the_same_global_row(then, now, monkeypatch):
    """The epoch's order is cut into blocks of world x batch rows, rank r taking the r-th
    batch of each: after k steps every layout has read the same first rows of the order,
    so the rows left are the same, however they are spread over the ranks."""
    order, consumed_steps = permutation(48, 5, 1), 3
    read = consumed_steps * then[0] * then[1]  # global rows read before the save
    as_rank(monkeypatch, 0, then[0])
    saver = sampler(48, seed=5, batch_size=then[1])
    saver.set_epoch(1)
    state = saver.state_dict(consumed=consumed_steps * then[1])
    rest = []
    for rank in range(now[0]):
        as_rank(monkeypatch, rank, now[0])
        s = sampler(48, seed=5, batch_size=now[1])
        s.load_state_dict(state)
        rest.append(list(s))
    assert sorted(sum(rest, [])) == sorted(order[read:])  # nothing read twice or skipped
    steps = [rest[r][i : i + now[1]] for i in range(0, len(rest[0]), now[1]) for r in
             range(now[0])]  # fmt: skip
    assert sum(steps, []) == order[read:]  # and in the order of the global batches


def test_a_resume_whose_layout_cannot_continue_the_epoch_is_refused(monkeypatch):
    as_rank(monkeypatch, 0, 1)
    state = sampler(48, seed=5, batch_size=6).state_dict(consumed=6)  # 6 rows read
    as_rank(monkeypatch, 0, 2)
    with pytest.raises(CheckpointError, match=r"read 6 rows of epoch 0 as 1 process\(es\) "
                       r"x 6 rows, not a whole number of this run's steps of 2 x 2: resume "
                       r"with the checkpoint's devices and loader.batch_size, or a layout "
                       r"whose rows per micro-step divide it"):  # fmt: skip
        sampler(48, seed=5, batch_size=2).load_state_dict(state)


def test_a_strided_shard_resumes_at_its_row_under_another_batch_size(monkeypatch):
    """drop_last=False shards by stride, not in blocks of rows per micro-step: another
    batch size reads on from the same row, with no whole-steps check (8 rows % 3 != 0)."""
    as_rank(monkeypatch, 0, 1)
    order = list(sampler(48, seed=5, drop_last=False, batch_size=4))
    state = sampler(48, seed=5, drop_last=False, batch_size=4).state_dict(consumed=8)
    s = sampler(48, seed=5, drop_last=False, batch_size=3)
    s.load_state_dict(state)
    assert list(s) == order[8:]


def test_an_old_state_without_a_layout_reads_as_this_runs(monkeypatch):
    as_rank(monkeypatch, 1, 2)
    s = sampler(48, seed=5, batch_size=2)
    s.load_state_dict({"epoch": 0, "start": 4, "seed": 5})
    assert s.start == 4


def test_set_epoch_sets_the_epoch_and_keeps_a_loaded_position():
    s = sampler(20, seed=8)
    s.set_epoch(4)
    assert s.epoch == 4
    assert list(s) == permutation(20, 8, 4)
    s.load_state_dict({"epoch": 4, "start": 5})
    s.set_epoch(4)  # Lightning's call at the resumed epoch's start keeps the position
    assert s.start == 5
    assert list(s) == permutation(20, 8, 4)[5:]


# ---------------------------------------------------------------- resume_state.gather_rng
def draws() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(3).tolist(), random.random()


def test_gather_rng_without_a_process_group_is_this_processs_state():
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    states = resume_state.gather_rng()
    assert isinstance(states, list) and len(states) == 1
    own = utils.get_rng_state()
    assert set(states[0]) == set(own)
    assert torch.equal(states[0]["torch"], own["torch"])
    assert states[0]["python"] == own["python"]
    expected = draws()
    assert draws() != expected  # the streams moved on
    utils.set_rng_state(states[0])
    assert draws() == expected  # and the saved state restores them


def test_gather_rng_collects_one_state_per_rank(monkeypatch):
    dist = torch.distributed
    calls = []

    def all_gather_object(out, obj):
        calls.append(len(out))
        for r in range(len(out)):
            out[r] = {"rank": r, "own": obj}

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    marker = {"torch": torch.zeros(2)}
    monkeypatch.setattr(utils, "get_rng_state", lambda: marker)
    states = resume_state.gather_rng()
    assert calls == [3]
    assert [s["rank"] for s in states] == [0, 1, 2]
    assert all(s["own"] is marker for s in states)


def test_gather_rng_with_an_uninitialised_but_available_dist(monkeypatch):
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    marker = {"torch": torch.ones(1)}
    monkeypatch.setattr(utils, "get_rng_state", lambda: marker)
    assert resume_state.gather_rng() == [marker]


def test_gather_rng_when_dist_is_not_available(monkeypatch):
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # (never asked)
    marker = {"torch": torch.ones(1)}
    monkeypatch.setattr(utils, "get_rng_state", lambda: marker)
    assert resume_state.gather_rng() == [marker]


# ---------------------------------------------------------------- resume_state.capture
RNG = [{"torch": "rank0"}, {"torch": "rank1"}]


def test_capture_inside_a_window_records_the_partial_window_and_no_data():
    s = sampler(20, seed=4)
    s.set_epoch(1)
    assert resume_state.capture(RNG, s, 5, 2, 4) == {"rng": RNG, "partial_window": [2, 4]}
    assert resume_state.capture(RNG, None, 5, 1, 8) == {"rng": RNG, "partial_window": [1, 8]}
    assert resume_state.capture(RNG, s, 0, 3, 4)["partial_window"] == [3, 4]


def test_capture_between_steps_records_the_samplers_position():
    s = sampler(20, seed=4)
    s.set_epoch(3)
    state = resume_state.capture(RNG, s, 12, 0, 4)
    data = {"epoch": 3, "start": 12, "seed": 4, "world": 1, "batch_size": 1}
    assert state == {"rng": RNG, "data": data}
    assert state["rng"] is RNG


def test_capture_passes_rows_seen_as_the_consumed_rows():
    class Recorder:
        def state_dict(self, consumed):
            return {"consumed": consumed}

    assert resume_state.capture(RNG, Recorder(), 7, 0, 2) == {"rng": RNG, "data": {"consumed": 7}}


def test_capture_without_a_sampler_records_the_rng_only():
    assert resume_state.capture(RNG, None, 12, 0, 4) == {"rng": RNG}


# ---------------------------------------------------------------- resume_state.data_position
def loops(completed):
    return {"fit_loop": {"epoch_progress": {"total": {"completed": completed, "ready": 9}}}}


DATA = {"epoch": 2, "start": 6, "seed": 1}


@pytest.mark.parametrize(
    "loop_state",
    [
        None,
        {},
        {"fit_loop": {}},
        {"fit_loop": {"epoch_progress": {}}},
        {"fit_loop": {"epoch_progress": {"total": {}}}},
        {"fit_loop": None},
        {"fit_loop": {"epoch_progress": {"total": {"completed": None}}}},
    ],
)
def test_data_position_without_lightnings_epoch_count_is_the_saved_one(loop_state):
    state = {"rng": RNG, "data": dict(DATA)}
    data = resume_state.data_position(state, loop_state)
    assert data == {"epoch": 2, "start": 6, "seed": 1}
    assert data is not state["data"]  # a copy
    data["start"] = 0
    assert state["data"] == DATA  # the checkpoint's own entry is not changed


@pytest.mark.parametrize("completed", [0, 1, 2])
def test_data_position_inside_the_open_epoch_is_the_saved_one(completed):
    state = {"data": dict(DATA)}
    assert resume_state.data_position(state, loops(completed)) == DATA


@pytest.mark.parametrize("completed", [3, 7])
def test_data_position_after_lightning_closed_the_epoch_is_the_next_ones_start(completed):
    state = {"data": dict(DATA)}
    data = resume_state.data_position(state, loops(completed))
    assert data == {"epoch": completed, "start": 0, "seed": 1}
    assert state["data"] == DATA


@pytest.mark.parametrize("kind", [torch.tensor, np.int64, str])
def test_data_position_reads_the_epoch_count_as_an_int(kind):
    data = resume_state.data_position({"data": dict(DATA)}, loops(kind(3)))
    assert data == {"epoch": 3, "start": 0, "seed": 1}
    assert type(data["epoch"]) is int


def test_data_position_then_the_sampler_resumes_the_next_epoch():
    s = sampler(20, seed=1)
    s.set_epoch(2)
    s.load_state_dict(resume_state.data_position({"data": dict(DATA)}, loops(3)))
    assert list(s) == permutation(20, 1, 3)


# ---------------------------------------------------------------- resume_state.check_resumable
@pytest.mark.parametrize("micro,accumulate", [(2, 4), (1, 8)])
def test_check_resumable_refuses_a_mid_window_checkpoint(micro, accumulate):
    with pytest.raises(CheckpointError) as caught:
        resume_state.check_resumable({"rng": RNG, "partial_window": [micro, accumulate]})
    message = str(caught.value)
    assert message == (
        f"this checkpoint was saved by a validation after micro-batch {micro} of {accumulate} "
        "of an accumulation window, which cannot be resumed exactly: resume from last.ckpt "
        "or a step=N.ckpt (evaluating it is fine), and set trainer.val_check_interval to a "
        f"multiple of {accumulate}"
    )
    assert "\n" not in message


@pytest.mark.parametrize("state", [{"rng": RNG, "data": dict(DATA)}, {"rng": RNG}, {}])
def test_check_resumable_accepts_a_checkpoint_between_steps(state):
    assert resume_state.check_resumable(state) is None
