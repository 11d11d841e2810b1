"""The tests of the harness, the scripts and the srlora_* add-ons, one file per module or script
(test_srlora.py, the method's own, sits at the root beside srlora.py)."""
