"""Sub-network spaces and samplers: sizes, distributions (chi-square), determinism across ranks."""

import collections

import numpy as np
import pytest
from scipy import stats

from st_scale.sampling import STREAM_EVAL_SAMPLE, STREAM_SUBNET, SubnetSampler, SubnetSpace, step_rng


@pytest.mark.parametrize(
    "stage_sizes, count",
    [
        ((3, 4, 6, 3), 216),  # ResNet-50
        ((3, 4, 23, 3), 828),  # ResNet-101
        ((3, 8, 36, 3), 2592),  # ResNet-152
        ((9, 9, 9), 729),  # CIFAR ResNet-56
        ((18, 18, 18), 5832),  # CIFAR ResNet-110
    ],
)
def test_space_sizes_match_the_paper(stage_sizes, count):
    space = SubnetSpace.full(stage_sizes)
    assert len(space) == count
    members = list(space)
    assert len(members) == len(set(members)) == count
    assert members == sorted(members)
    assert all(space.unrank(i) == d for i, d in enumerate(members))


def test_st_plus_plus_restricted_space_has_eight_subnets():
    space = SubnetSpace.restricted((3, 4, 6, 3), max_dropped=(0, 1, 3, 0))
    assert len(space) == 8
    assert set(space) == {(3, a, b, 3) for a in (3, 4) for b in (3, 4, 5, 6)}


def _refusal(build) -> str:
    """The message of the ValueError `build()` raises."""
    with pytest.raises(ValueError) as refused:
        build()
    return str(refused.value)


def test_bad_spaces_are_named_word_for_word_and_the_bounds_themselves_accepted():
    assert _refusal(lambda: SubnetSpace((), (), ())) == "stage_sizes is empty: a space needs at least one stage"
    assert _refusal(lambda: SubnetSpace((3, 3), (1, 1), (3,))) == (
        "min_depths [1, 1] and max_depths [3] need one entry per stage (2 stages: [3, 3])"
    )
    assert _refusal(lambda: SubnetSpace((3, 3), (1,), (3, 3))) == (
        "min_depths [1] and max_depths [3, 3] need one entry per stage (2 stages: [3, 3])"
    )
    assert _refusal(lambda: SubnetSpace((3, 0), (1, 1), (3, 1))) == "stage_sizes[1]=0: a stage has at least one block"
    assert _refusal(lambda: SubnetSpace((3, 3), (0, 1), (3, 3))) == "stage 0: depth bounds [0, 3] must lie within 1..3"
    for lo, hi in ((4, 3), (1, 0), (1, 4)):
        assert _refusal(lambda lo=lo, hi=hi: SubnetSpace((3,), (lo,), (hi,))) == (
            f"stage 0: depth bounds [{lo}, {hi}] must lie within 1..3"
        )
    assert _refusal(lambda: SubnetSpace((3, 3), (1, 3), (3, 2))) == (
        "stage 1: min depth 3 > max depth 2 excludes every sub-network; choose min <= max"
    )
    with pytest.raises(ValueError, match=r"max_dropped\[1\]=4: stage 1 has 4 blocks, so drop 0..3"):
        SubnetSpace.restricted((3, 4), (0, 4))
    assert list(SubnetSpace((3,), (1,), (3,))) == [(1,), (2,), (3,)]  # 1..size: both ends are members
    assert list(SubnetSpace((3,), (2,), (2,))) == [(2,)]  # min == max: one member
    # The smallest stage and the smallest depth: a one-block stage, a stage capped at its first block
    assert list(SubnetSpace((1, 2), (1, 1), (1, 2))) == [(1, 1), (1, 2)]
    assert list(SubnetSpace((2, 2), (1, 1), (2, 1))) == [(1, 1), (2, 1)]


def test_bad_sampler_settings_are_named_word_for_word_and_the_defaults_are_the_papers():
    space = SubnetSpace.full((3, 3))
    for decay in (0, -0.5, 1.5):
        assert _refusal(lambda decay=decay: SubnetSampler(space, decay=decay)) == (
            f"sampler decay={decay}: must be in (0, 1]; 1 is uniform, smaller favours larger sub-nets"
        )
    assert _refusal(lambda: SubnetSampler(space, seed=-1)) == "sampler seed=-1: must be >= 0"
    assert _refusal(lambda: SubnetSampler(SubnetSpace.restricted((3, 3), (0, 0)), include_full=False)) == (
        "include_full=False but the space holds only the full network: nothing to sample"
    )
    # Without the full net, each stage of (3, 3) keeps all 3 blocks with probability 1 / (1 + d + d^2):
    # at decay 0.004 anything else comes up 0.8% of the time (refused), at 0.006 1.2% (accepted).
    assert _refusal(lambda: SubnetSampler(space, decay=0.004, include_full=False)) == (
        "sampler decay=0.004 with include_full=False: a draw other than the full network comes up with "
        "probability 0.008, below 0.01; raise decay or include the full network"
    )
    assert SubnetSampler(space, decay=0.006, include_full=False).sample(0) != (3, 3)
    assert SubnetSampler(space, decay=1.0, seed=0).decay == 1.0  # the bounds themselves are accepted
    default = SubnetSampler(space)  # the paper's sampling: uniform, the full net included, one draw for all ranks
    assert (default.seed, default.decay, default.include_full, default.per_rank) == (0, 1.0, True, False)
    assert SubnetSampler(SubnetSpace.restricted((3, 3), (0, 1)), include_full=False).sample(0) == (3, 2)


def _chi_square_p(sampler: SubnetSampler, draws: int) -> float:
    counts = collections.Counter(sampler.sample(step) for step in range(draws))
    members = [d for d in sampler.space if sampler.probability(d) > 0]
    assert set(counts) <= set(members), "drew a sub-network with probability 0"
    expected = np.array([sampler.probability(d) for d in members]) * draws
    observed = np.array([counts[d] for d in members])
    return stats.chisquare(observed, expected).pvalue


def _expected(space, decay, include_full):
    """Independent reference: P(d) proportional to decay ** (number of dropped blocks)."""
    weights = {d: decay ** sum(n - x for n, x in zip(space.max_depths, d)) for d in space}
    if not include_full:
        weights.pop(space.max_depths)
    total = sum(weights.values())
    return {d: w / total for d, w in weights.items()}


@pytest.mark.parametrize(
    "space, decay, include_full",
    [
        (SubnetSpace.full((3, 3, 3)), 1.0, True),  # the paper's uniform sampling
        (SubnetSpace.full((3, 3, 3)), 1.0, False),  # without the full net
        (SubnetSpace.full((3, 4, 2)), 0.5, True),  # biased towards larger sub-nets
        (SubnetSpace.restricted((3, 4, 6, 3), (0, 1, 3, 0)), 1.0, True),  # ST++ 8-net space
        (SubnetSpace.restricted((3, 4, 6, 3), (0, 1, 3, 0)), 0.7, False),
    ],
)
def test_sampler_draws_its_distribution(space, decay, include_full):
    sampler = SubnetSampler(space, seed=3, decay=decay, include_full=include_full)
    reference = _expected(space, decay, include_full)
    for d in space:
        assert sampler.probability(d) == pytest.approx(reference.get(d, 0.0))
    # 6,000 draws: a wrong distribution of this size is rejected with near certainty.
    assert _chi_square_p(sampler, 6000) > 1e-3


def test_chi_square_rejects_a_wrong_distribution():
    # The test above must be able to fail: uniform draws checked against a biased reference.
    space = SubnetSpace.full((3, 4, 2))
    uniform = SubnetSampler(space, seed=3)
    biased = SubnetSampler(space, seed=3, decay=0.5)
    counts = collections.Counter(uniform.sample(step) for step in range(6000))
    expected = np.array([biased.probability(d) for d in space]) * 6000
    assert stats.chisquare(np.array([counts[d] for d in space]), expected).pvalue < 1e-6


def test_draws_are_a_pure_function_of_seed_step_and_k():
    space = SubnetSpace.full((9, 9, 9))
    a, b = SubnetSampler(space, seed=7), SubnetSampler(space, seed=7)
    assert [a.sample(s, k) for s in range(50) for k in range(3)] == [
        b.sample(s, k) for s in range(50) for k in range(3)
    ]
    assert [a.sample(s) for s in range(50)] != [SubnetSampler(space, seed=8).sample(s) for s in range(50)]
    assert [a.sample(s, 0) for s in range(50)] != [a.sample(s, 1) for s in range(50)]


def test_ranks_agree_by_default_and_differ_per_rank():
    space = SubnetSpace.full((9, 9, 9))
    shared = SubnetSampler(space, seed=1)
    assert all(shared.sample(s, 0, rank=0) == shared.sample(s, 0, rank=r) for s in range(100) for r in (1, 5))
    per_rank = SubnetSampler(space, seed=1, per_rank=True)
    assert per_rank.sample(5, 0, rank=1) == per_rank.sample(5, 0, rank=1)
    differing = sum(per_rank.sample(s, 0, rank=0) != per_rank.sample(s, 0, rank=1) for s in range(100))
    assert differing > 90  # 728/729 of independent pairs differ


def test_per_rank_draws_are_each_uniform():
    sampler = SubnetSampler(SubnetSpace.full((3, 3)), seed=2, per_rank=True)
    counts = collections.Counter(sampler.sample(s, 0, rank=3) for s in range(4500))
    assert stats.chisquare([counts[d] for d in sampler.space]).pvalue > 1e-3


def test_fixed_seed_subset_for_huge_spaces():
    space = SubnetSpace.full((18, 18, 18))
    subset = space.sample_subset(100, seed=0)
    assert len(subset) == len(set(subset)) == 100 and all(d in space for d in subset)
    assert subset == space.sample_subset(100, seed=0)
    assert subset != space.sample_subset(100, seed=1)
    assert SubnetSpace.full((2, 2)).sample_subset(100, seed=0) == list(SubnetSpace.full((2, 2)))
    # From a stream of its own: not the draw the training sampler's stream gives for the same seed
    for stream, same in ((STREAM_EVAL_SAMPLE, True), (STREAM_SUBNET, False)):
        drawn = step_rng(0, 0, stream=stream).choice(len(space), size=100, replace=False)
        assert (subset == sorted(space.unrank(int(i)) for i in drawn)) is same


def test_subsets_are_distinct_members_of_any_size_from_one_to_the_whole_space():
    space = SubnetSpace.full((9, 9, 9))
    nearly_all = space.sample_subset(700, seed=3)  # drawn with replacement, duplicates would be certain
    assert len(set(nearly_all)) == 700 and nearly_all == sorted(nearly_all)
    one = space.sample_subset(1, seed=3)
    assert len(one) == 1 and one[0] in space
    with pytest.raises(ValueError, match="sample size 0: must be >= 1"):
        space.sample_subset(0, seed=3)


def test_membership_needs_one_depth_per_stage_within_bounds():
    space = SubnetSpace.full((3, 3, 3))
    assert (1, 2, 3) in space and [3, 3, 3] in space
    for outside in ((1, 1), (1, 1, 1, 1), [2, 2], (0, 1, 1), (1, 1, 4), 5, "abc"):
        assert outside not in space, outside


def test_restricted_spaces_drop_up_to_all_but_the_first_block():
    assert set(SubnetSpace.restricted((3, 4), (2, 3))) == set(SubnetSpace.full((3, 4)))
    with pytest.raises(ValueError, match=r"max_dropped \[0\] needs one entry per stage \(2\)"):
        SubnetSpace.restricted((3, 4), (0,))


def test_sample_and_sample_many_draw_for_rank_0_unless_told():
    sampler = SubnetSampler(SubnetSpace.full((9, 9, 9)), seed=2, per_rank=True)
    assert all(sampler.sample_many(s, 3) == sampler.sample_many(s, 3, rank=0) for s in range(20))
    assert all(sampler.sample(s) == sampler.sample(s, 0, rank=0) for s in range(20))
    assert any(sampler.sample_many(s, 3) != sampler.sample_many(s, 3, rank=1) for s in range(20))


def test_the_draws_of_one_step_are_its_kth_draws_each_from_its_own_stream():
    """The k-th of a step's sub-networks is draw k of that step and rank, so the draws of one step
    differ from each other (of 729 members, three equal draws in one step are rare: none of these 20
    steps has them; a stream reused for every k would give them in all)."""
    sampler = SubnetSampler(SubnetSpace.full((9, 9, 9)), seed=2, per_rank=True)
    for rank in (0, 3):
        for step in range(20):
            assert sampler.sample_many(step, 3, rank) == [sampler.sample(step, k, rank) for k in range(3)]
        assert all(len(set(sampler.sample_many(step, 3, rank))) > 1 for step in range(20))


def test_the_rejection_of_the_full_net_gives_up_after_the_10000_tries_its_message_names(monkeypatch):
    """A sampler that would rarely draw anything but the full net is refused when built (above); the
    rejection loop stays bounded all the same: with a random stream stuck on each stage's deepest
    choice it ends after 10,000 tries (one draw per stage each) and says so."""
    import st_scale.sampling as sampling

    draws = []

    class StuckRng:
        def choice(self, choices: int, p) -> int:
            draws.append(choices)
            return choices - 1

    monkeypatch.setattr(sampling, "step_rng", lambda *args, **kwargs: StuckRng())
    sampler = SubnetSampler(SubnetSpace.full((2, 2)), include_full=False)
    with pytest.raises(RuntimeError) as gave_up:
        sampler.sample(0)
    assert str(gave_up.value) == "could not draw a sub-network other than the full net in 10,000 tries"
    assert draws == [2] * (10_000 * 2)


def test_each_draw_is_seeded_by_its_seed_step_k_rank_and_stream():
    """The seeding is part of what a run is: the same recipe draws the same sub-networks on any version.
    The draw shared by every rank (rank=None) has a word of its own, apart from each rank's (rank + 1)."""

    def seeded(*words: int) -> np.ndarray:
        return np.random.default_rng(np.random.SeedSequence(list(words))).random(4)

    assert np.array_equal(step_rng(5, 7, 2).random(4), seeded(5, 7, 2, 0, STREAM_SUBNET))
    assert np.array_equal(step_rng(5, 7, 2, rank=0).random(4), seeded(5, 7, 2, 1, STREAM_SUBNET))
    assert np.array_equal(
        step_rng(5, 7, 2, rank=3, stream=STREAM_EVAL_SAMPLE).random(4), seeded(5, 7, 2, 4, STREAM_EVAL_SAMPLE)
    )
    assert not np.array_equal(step_rng(5, 7, 2).random(4), step_rng(5, 7, 2, rank=0).random(4))


def test_step_rng_rejects_negative_fields():
    for arguments, message in (
        ((-2, 0), "seed=-2: must be >= 0"),
        ((0, -1), "step=-1: must be >= 0"),
        ((0, 0, -3), "k=-3: must be >= 0"),
    ):
        assert _refusal(lambda arguments=arguments: step_rng(*arguments)) == message


def test_space_check_accepts_members_and_names_the_bounds_otherwise():
    space = SubnetSpace.restricted((3, 4, 6, 3), max_dropped=(0, 1, 3, 0))
    assert space.check([3, 3, 3, 3]) == (3, 3, 3, 3) and space.check((3, 4, 6, 3)) == (3, 4, 6, 3)
    for outside in ((3, 2, 6, 3), (2, 4, 6, 3), (3, 4, 7, 3)):
        with pytest.raises(ValueError, match=r"is not in the space \(per-stage bounds \[\[3, 3\], \[3, 4\], \[3, 6\]"):
            space.check(outside)
