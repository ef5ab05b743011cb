"""The packaged evaluation prompt set and prompt formatting."""

import pytest

from customcrafter.evaluation.prompts import EvalPrompt, evaluation_prompts, format_prompt, pluralize


@pytest.mark.parametrize("kind", ["live", "object"])
def test_ten_prompts_per_kind_motion_first_with_positional_index(kind):
    prompts = evaluation_prompts(kind)
    assert len(prompts) == 10
    assert all(isinstance(p, EvalPrompt) and "{subject}" in p.template for p in prompts)
    assert [p.index for p in prompts] == list(range(10))
    types = [p.type for p in prompts]
    assert set(types) == {"motion", "static"}
    assert types == sorted(types)  # motion (m) before static (s): the index order is part of the protocol
    assert len({p.template for p in prompts}) == 10


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="kind"):
        evaluation_prompts("animal")


def test_format_prompt_singular_plural_and_class_only():
    assert format_prompt("{subject} is walking", "<new1>", "dog") == "<new1> dog is walking"
    assert format_prompt("two {subject}s on a table", "<new1>", "box") == "two <new1> boxes on a table"
    assert format_prompt("two {subject}s", "<new1>", "teddy bear") == "two <new1> teddy bears"
    assert format_prompt("{subject} is walking", "", "dog") == "dog is walking"
    with pytest.raises(ValueError, match="placeholder"):
        format_prompt("a dog", "<new1>", "dog")


@pytest.mark.parametrize(
    "word,plural",
    [
        ("dog", "dogs"),
        ("puppy", "puppies"),
        ("toy", "toys"),
        ("glass", "glasses"),
        ("sunglasses", "sunglasses"),
        ("watch", "watches"),
    ],
)
def test_pluralize(word, plural):
    assert pluralize(word) == plural


def test_every_packaged_prompt_formats():
    for kind in ("live", "object"):
        for prompt in evaluation_prompts(kind):
            text = format_prompt(prompt.template, "<new1>", "cat")
            assert "{" not in text and "<new1> cat" in text
