"""The model-space protocol: sampling, enumeration, validation, loading."""
import numpy as np
import pytest

from harness.errors import HarnessError, InvalidSample
from harness.spaces.space import (SampleValidator, checked_search_space, enumerate_samples, load_space,
                           random_samples, space_fingerprint, space_size, validate_sample)
from harness.spaces import ProxylessSpace, TinySpace


def test_seeded_sampling_is_repeatable_and_covers_choices():
    space = TinySpace()
    assert random_samples(space, 20, seed=5) == random_samples(space, 20, seed=5)
    assert random_samples(space, 20, seed=5) != random_samples(space, 20, seed=6)
    choices = checked_search_space(space)
    seen = {label: set() for label in choices}
    for sample in random_samples(space, 200, seed=1):
        assert validate_sample(choices, sample) == sample
        for label, value in sample.items():
            seen[label].add(value)
    assert all(seen[label] == set(values) for label, values in choices.items())


def test_enumeration_matches_the_size():
    space = TinySpace()
    samples = list(enumerate_samples(space))
    assert len(samples) == space_size(space) == 2 * 2 * (3 * 2) ** 4 * 2 * 2
    assert len({tuple(s.items()) for s in samples}) == len(samples)


def test_proxyless_space_has_the_expected_labels():
    space = checked_search_space(ProxylessSpace())
    assert space["stage1.depth"] == [2, 3, 4]
    assert space["stage1.block0.kernel"] == [3, 5, 7]
    assert space["stage1.block0.expand"] == [3, 6]
    assert space["stage1.block1.skip"] == [True, False]
    assert "stage1.block0.skip" not in space and "stage6.depth" not in space
    assert ProxylessSpace().dummy_input().shape == (1, 3, 224, 224)


def test_validation_names_the_label_and_the_allowed_values():
    choices = checked_search_space(TinySpace())
    good = random_samples(TinySpace(), 1)[0]
    with pytest.raises(InvalidSample, match=r"unknown label 'stage9.depth'"):
        validate_sample(choices, dict(good, **{"stage9.depth": 1}))
    missing = dict(good)
    del missing["stage2.block0.kernel"]
    with pytest.raises(InvalidSample) as caught:
        validate_sample(choices, missing)
    assert "missing label 'stage2.block0.kernel'" in str(caught.value)
    assert "[3, 5, 7]" in str(caught.value)
    with pytest.raises(InvalidSample) as caught:
        validate_sample(choices, dict(good, **{"stage1.block0.kernel": 9}))
    assert "'stage1.block0.kernel' has value 9" in str(caught.value)
    assert "pick one of [3, 5, 7]" in str(caught.value)
    with pytest.raises(InvalidSample, match="not among the choices"):
        validate_sample(choices, dict(good, **{"stage1.block1.skip": 1}))  # 1 is not True
    with pytest.raises(InvalidSample, match="not among the choices"):
        validate_sample(choices, dict(good, **{"stage1.depth": True}))  # True is not 1
    with pytest.raises(InvalidSample, match="not among the choices"):
        validate_sample(choices, dict(good, **{"stage1.depth": [1]}))
    with pytest.raises(InvalidSample, match="must be a dict"):
        validate_sample(choices, [("stage1.depth", 1)])


def test_numpy_values_become_the_exact_choices():
    choices = checked_search_space(TinySpace())
    good = random_samples(TinySpace(), 1)[0]
    numpyish = {k: (np.int64(v) if type(v) is int else np.bool_(v)) for k, v in good.items()}
    checked = SampleValidator(choices)(numpyish)
    assert checked == good
    assert all(type(checked[k]) is type(good[k]) for k in good)


class BrokenSpace:
    def __init__(self, space):
        self._space = space

    def search_space(self):
        return self._space

    def freeze(self, sample):
        raise NotImplementedError


@pytest.mark.parametrize("space, word", [({}, "search_space"), ({"a": []}, "no choices"),
                                         ({"a": [1, 1]}, "repeats"),
                                         ({"a": [object()]}, "JSON scalars")])
def test_bad_search_spaces_are_refused(space, word):
    with pytest.raises(HarnessError, match=word):
        checked_search_space(BrokenSpace(space))


def test_fingerprint_follows_config_and_extra():
    a = space_fingerprint(TinySpace(), {"inputs": [1]})
    assert a == space_fingerprint(TinySpace(), {"inputs": [1]})
    assert a != space_fingerprint(TinySpace(), {"inputs": [2]})
    wider = TinySpace()
    wider.head_channels = 64
    assert a != space_fingerprint(wider, {"inputs": [1]})


def test_load_space():
    assert isinstance(load_space("harness.spaces:TinySpace"), TinySpace)
    for spec, word in [("harness.spaces", "MODULE:ATTR"), ("no_such_module:X", "cannot import"),
                       ("harness.spaces:Nope", "no attribute"),
                       ("harness.paths:harness_home", "not a model space"),
                       ("harness.errors:HarnessError", "cannot create")]:
        with pytest.raises(HarnessError, match=word):
            load_space(spec)
