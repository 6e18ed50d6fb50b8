"""The LM zoo's check that an expert beats the base on its own column (esm_ray.zoo.lm_zoo.beats_base)."""

from esm_ray.zoo.lm_zoo import beats_base


def test_an_expert_whose_interval_reaches_the_base_is_weak():
    # seed 1's headline_period expert: base 34.2%, expert 34.6% [28.8%, 40.8%]
    assert not beats_base("accuracy", 0.3417, (0.2875, 0.4083))
    # seed 0's: base 31.2%, expert 50.0% [44.2%, 55.8%]
    assert beats_base("accuracy", 0.312, (0.442, 0.558))


def test_perplexity_must_fall_below_the_base_with_its_whole_interval():
    assert beats_base("word_perplexity", 133.3, (50.7, 61.7))
    assert not beats_base("word_perplexity", 60.0, (50.7, 61.7))
    assert not beats_base("word_perplexity", 40.0, (50.7, 61.7))


def test_the_boundary_is_not_better():
    assert not beats_base("accuracy", 0.5, (0.5, 0.7))
    assert not beats_base("word_perplexity", 70.0, (50.0, 70.0))
