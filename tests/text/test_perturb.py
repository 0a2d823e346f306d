import random

import pytest

from diffalign.text.perturb import KINDS, perturb_caption, perturbations


def _all(caption, kinds):
    return {p.text for sites in perturbations(caption, kinds).values() for site in sites for p in site}


def test_colour_swaps_one_colour_and_keeps_the_article_in_agreement():
    out = _all("a photo of a red circle", "colour")
    assert "a photo of a blue circle" in out
    assert "a photo of an orange circle" in out  # not "a orange"
    assert "a photo of a red circle" not in out
    assert all(t.endswith(" circle") for t in out)


def test_count_changes_number_and_noun_agreement():
    out = _all("a photo of three triangles", "count")
    assert {"a photo of two triangles", "a photo of a triangle", "a photo of four triangles"} <= out
    assert "a photo of three triangles" not in out
    # the article is a count of one; the colour in between stays
    assert "a photo of two red circles" in _all("a photo of a red circle", "count")
    out = _all("a cat and 2 dogs", "count")
    assert {"a cat and 3 dogs", "a cat and 1 dog", "two cats and 2 dogs"} <= out
    assert all(("a cat" in t) != ("2 dogs" in t) for t in out)  # exactly one of the two counts changed
    # "a photo" is not a count: photo is not an object
    assert all(t.startswith("a photo of") for t in _all("a photo of a circle", "count"))


def test_object_stays_in_its_group_and_keeps_plural():
    out = _all("a photo of four squares", "object")
    assert "a photo of four circles" in out and "a photo of four boxes" in out
    assert not any("cat" in t for t in out)
    assert "a dog and a horse" in _all("a dog and a cat", "object")


def test_relation_becomes_its_opposite():
    assert _all("a photo of a circle left of a square", "relation") == {"a photo of a circle right of a square"}
    assert _all("a cup on top of a table", "relation") == {"a cup under a table"}
    assert _all("a circle above a square", ["relation"]) == {"a circle below a square"}


def test_perturb_caption_is_reproducible_and_differs():
    caption = "a photo of a red circle right of a blue square"
    a = [perturb_caption(caption, random.Random(s)) for s in range(30)]
    b = [perturb_caption(caption, random.Random(s)) for s in range(30)]
    assert a == b
    assert all(t != caption for t in a)
    assert len(set(a)) > 5
    kinds_seen = {k for t in a for k, sites in perturbations(caption).items()
                  if t in {p.text for site in sites for p in site}}
    assert kinds_seen == set(KINDS)


def test_no_rule_applies_and_bad_kind():
    assert perturb_caption("a landscape at sunset", random.Random(0)) is None
    assert perturb_caption("a red circle", random.Random(0), kinds=["relation"]) is None
    assert perturb_caption("a red circle", random.Random(0), kinds="color") != "a red circle"  # alias
    with pytest.raises(ValueError, match="unknown perturbation kind"):
        perturb_caption("a red circle", random.Random(0), kinds=["texture"])


def test_vocab_override():
    sites = perturbations("a red circle", "colour", vocab={"colour": ["red", "green"]})["colour"]
    out = {p.text for site in sites for p in site}
    assert out == {"a green circle"}


def test_vocab_limits_counts():
    sites = perturbations("a photo of three circles", "count", vocab={"count": [1, 2, 3, 4]})["count"]
    assert {p.text for site in sites for p in site} == {"a photo of a circle", "a photo of two circles",
                                                         "a photo of four circles"}
    with pytest.raises(ValueError, match="vocab"):
        perturbations("a red circle", "colour", vocab={"texture": ["smooth"]})
