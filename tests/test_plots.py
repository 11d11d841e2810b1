"""Tests of harness/plots.py: the active intervals that Fig. 4 and 5 are drawn from."""
from harness.plots import active_intervals


def test_active_intervals_follow_the_switch_events():
    records = [{"event": "train", "method": "srlora", "step": 30},
               {"event": "switch", "method": "srlora", "step": 10, "layer": "q", "slots": [1], "fused_out": [1], "brought_in": [2]},
               {"event": "switch", "method": "srlora", "step": 20, "layer": "q", "slots": [0], "fused_out": [0], "brought_in": [3]}]
    assert active_intervals(records, r=2) == {"q": {0: 20, 1: 10, 2: 20, 3: 10}}
