"""Caption policy: trigger word, keep_tokens + shuffle, variants for the cache, dropout."""

from __future__ import annotations

import random

import pytest

from training.captions import CaptionPolicy

CAPTION = "a cat, red hat, sitting, garden, sunny"


@pytest.mark.parametrize("kwargs,match", [
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ({"keep_tokens": -1}, "keep_tokens must be an int >= 0"),
    ({"keep_tokens": 1.5}, "keep_tokens must be an int >= 0"),
    ({"separator": ""}, "separator is empty"),
    ({"trigger": None}, "trigger must be a string"),
])
def test_invalid_policy_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CaptionPolicy(**kwargs)


def test_policy_is_frozen():
    with pytest.raises(AttributeError):
        CaptionPolicy().dropout = 0.5  # type: ignore[misc]


def test_default_policy_only_normalises_spacing():
    rng = random.Random(0)
    assert CaptionPolicy().render(CAPTION, rng) == CAPTION
    assert CaptionPolicy().render(" a,b ,, c ", rng) == "a, b, c"
    assert CaptionPolicy().render("A photo of a cat on a mat.", rng) == "A photo of a cat on a mat."
    assert CaptionPolicy().render("", rng) == ""


def test_trigger_is_prepended_once():
    policy = CaptionPolicy(trigger=" ohwx ")
    rng = random.Random(0)
    assert policy.trigger == "ohwx"
    assert policy.render(CAPTION, rng) == "ohwx, " + CAPTION
    assert policy.render("ohwx, a cat", rng) == "ohwx, a cat"
    assert policy.render("a cat, ohwx, hat", rng) == "ohwx, a cat, hat"  # moved, not repeated
    assert policy.render("ohwx man, a cat", rng) == "ohwx, ohwx man, a cat"  # a different tag
    assert policy.render("", rng) == "ohwx"


def test_trigger_placeholder_puts_the_trigger_where_the_caption_says():
    rng = random.Random(0)
    assert CaptionPolicy(trigger="ohwx").render("a photo of {trigger}, garden", rng) == "a photo of ohwx, garden"
    assert CaptionPolicy(trigger="ohwx").render("{trigger}", rng) == "ohwx"
    assert CaptionPolicy().render("{trigger}", rng) == ""  # no trigger: the empty caption
    assert CaptionPolicy().render("a photo of {trigger}", rng) == "a photo of"
    shuffled = CaptionPolicy(trigger="ohwx", shuffle=True, keep_tokens=0)
    for seed in range(20):  # the tags up to the trigger's stay first, never shuffled
        assert shuffled.render("{trigger}, red hair, smiling, outdoors", random.Random(seed)).startswith("ohwx, ")
        assert shuffled.render("a photo, {trigger} man, b, c, d", random.Random(seed)).startswith("a photo, ohwx man, ")
    assert len(set(shuffled.variants("{trigger}, a, b, c", 4, seed=0))) == 4  # the rest still shuffles


def test_multi_tag_trigger():
    policy = CaptionPolicy(trigger="ohwx,  man")
    rng = random.Random(0)
    assert policy.render("a photo", rng) == "ohwx, man, a photo"
    assert policy.render("ohwx, man, a photo", rng) == "ohwx, man, a photo"


def test_shuffle_keeps_trigger_and_kept_tokens_in_place():
    policy = CaptionPolicy(trigger="ohwx", shuffle=True, keep_tokens=1)
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        tags = policy.render(CAPTION, rng).split(", ")
        assert tags[:2] == ["ohwx", "a cat"]
        assert sorted(tags[2:]) == sorted(["red hat", "sitting", "garden", "sunny"])
        seen.add(tuple(tags))
    assert len(seen) > 10


def test_shuffle_is_deterministic_from_rng():
    policy = CaptionPolicy(shuffle=True)
    first = [policy.render(CAPTION, random.Random(s)) for s in range(5)]
    assert first == [policy.render(CAPTION, random.Random(s)) for s in range(5)]


def test_keep_tokens_beyond_the_caption_keeps_everything():
    policy = CaptionPolicy(shuffle=True, keep_tokens=10)
    assert policy.render(CAPTION, random.Random(0)) == CAPTION


def test_other_separator():
    policy = CaptionPolicy(separator="|", trigger="sks")
    assert policy.render("a | b|c", random.Random(0)) == "sks| a| b| c"


def test_variants_are_distinct_and_deterministic():
    policy = CaptionPolicy(trigger="ohwx", shuffle=True, keep_tokens=1)
    variants = policy.variants(CAPTION, 4, seed=3)
    assert len(variants) == 4 == len(set(variants))
    assert variants == policy.variants(CAPTION, 4, seed=3)
    assert variants != policy.variants(CAPTION, 4, seed=4)
    assert all(v.startswith("ohwx, a cat, ") for v in variants)


def test_variants_stop_at_the_number_of_distinct_orders():
    policy = CaptionPolicy(shuffle=True)
    assert sorted(policy.variants("a, b", 5, seed=0)) == ["a, b", "b, a"]
    assert policy.variants("a", 5, seed=0) == ["a"]
    assert CaptionPolicy(shuffle=True, keep_tokens=1).variants("a, b", 5, seed=0) == ["a, b"]


def test_variants_without_shuffle_is_one_caption():
    assert CaptionPolicy(trigger="t").variants(CAPTION, 8, seed=0) == ["t, " + CAPTION]


def test_variants_needs_a_positive_count():
    with pytest.raises(ValueError, match="count must be >= 1, got 0"):
        CaptionPolicy().variants(CAPTION, 0, seed=0)


def test_no_dropout_never_drops_nor_draws():
    rng = random.Random(0)
    state = rng.getstate()
    assert not any(CaptionPolicy().drops(rng) for _ in range(1000))
    assert rng.getstate() == state


def test_dropout_rate():
    policy = CaptionPolicy(dropout=0.25)
    first, second = random.Random(0), random.Random(0)
    draws = [policy.drops(first) for _ in range(20000)]
    assert 0.23 < sum(draws) / len(draws) < 0.27
    assert draws == [policy.drops(second) for _ in range(20000)]
