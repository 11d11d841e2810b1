"""Run the results suites and write docs/RESULTS.md with its tables and plots.

    python experiments/run_results.py --suite text        # 3 seeds x {LoRA, PiSSA, SRLoRA}, MiniLM on tweets
    python experiments/run_results.py --suite ablations   # gamma, r_target, optimizer-state and reset policies
    python experiments/run_results.py --suite vision      # 3 seeds x {LoRA, PiSSA, SRLoRA}, DINOv2-S/14 on MNIST
    python experiments/run_results.py --suite alternatives  # the switch options of srlora.py, 3 seeds each
    python experiments/run_results.py --suite long-r4     # 1,000 steps at r=4, r_target=32
    python experiments/run_results.py --suite rank-sweep  # r=1; r=8 with r_target=64
    python experiments/run_results.py --suite llm         # SmolLM2-135M on Polish man pages (experiments/llm.py)
    python experiments/run_results.py --suite moments     # SRLoRA, Adam's 2nd moment kept or reset, r=2 and 8
    python experiments/run_results.py --suite long-r4 --run lora-seed0   # one named run of a suite
    python experiments/run_results.py --report            # only rebuild RESULTS.md and plots from docs/results/

Each run is the training script itself, run as a subprocess with the flags of its suite
(suites.py).  Its small outputs (config.json, metrics.json, log.jsonl) are copied to
docs/results/<suite>/<run>/; the report (report.py, from stats.py and plots.py) is computed from
those files alone, so anyone can regenerate it without re-training.
Extra flags after `--` go to every training run (e.g. `-- --data_dir=glue/RTE --task=rte`).
"""
import argparse

from suites import SUITES, run_suite     # first: it puts the repository root (srlora, harness) on the path
from report import write_report  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), action="append", default=[],
                        help="run this suite (repeatable), then rewrite the report")
    parser.add_argument("--report", action="store_true", help="only rewrite docs/RESULTS.md and its plots")
    parser.add_argument("--run", action="append", default=[],
                        help="run only this named run of the suite (repeatable), e.g. --run seed1")
    parser.add_argument("extra", nargs="*", help="flags after -- go to every training run")
    args = parser.parse_args()
    if not args.suite and not args.report:
        parser.error("pass --suite <name> (e.g. text, llm), or --report")
    for suite in args.suite:
        run_suite(suite, args.extra, args.run)
    write_report()


if __name__ == "__main__":
    main()
