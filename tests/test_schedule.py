"""Tests of harness/schedule.py: the seeded data order and the warm-up of the learning-rate schedule."""
import pytest
from hypothesis import given, settings, strategies as st

from harness import schedule
from harness.errors import UserError
from harness.schedule import Batches
from tests.helpers import ToyConfig


@given(warmup=st.integers(0, 600), max_steps=st.integers(1, 600))
@settings(max_examples=50, deadline=None)
def test_warmup_warning_fires_when_the_warmup_is_not_shorter_than_the_run_and_states_the_lr_peak(warmup, max_steps):
    cfg = ToyConfig(warmup=warmup, max_steps=max_steps, lr=3e-5)
    peak = max(map(schedule.lr_lambda(cfg), range(max_steps)))      # the factors of the steps the run takes
    message = schedule.warmup_warning(cfg)
    assert (message is not None) == (warmup >= max_steps)
    if message is None:
        assert peak == 1.0
    else:
        assert f"--warmup={warmup} " in message and f"peaks at {peak:.0%} of --lr=3e-05" in message


def test_batches_follow_seeded_epochs_and_resume_from_their_state():
    a = Batches(10, 3, seed=1)
    seen = [a.next() for _ in range(3)]
    assert sorted(sum(seen, [])) == sorted(set(sum(seen, []))) and len(sum(seen, [])) == 9
    b = Batches(10, 3, seed=1)
    b.load_state_dict(a.state_dict())
    assert [a.next() for _ in range(5)] == [b.next() for _ in range(5)]
    with pytest.raises(UserError, match="batch_size"):
        Batches(2, 3, 0)
