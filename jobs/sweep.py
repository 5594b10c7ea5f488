"""Ray Tune + Optuna sweep over the (label ratio, missing rate) grid, then its report.

`ray job submit` entry point: the options are exactly those of `sslmm tune`; when the sweep
succeeds, `sslmm report <--storage>` writes the tables and heatmaps to <storage>/report/. E.g.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- python jobs/sweep.py --help
"""

import sys

from _entry import option_value, run, run_then

if __name__ == "__main__":
    storage = option_value(sys.argv[1:], "--storage")
    if storage is None or "--help" in sys.argv[1:]:
        run("tune")  # tune itself explains what is missing (or prints its help)
    else:
        run_then("tune", ["report", storage])
