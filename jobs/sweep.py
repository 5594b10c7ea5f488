"""Ray Tune + Optuna sweep over the (label ratio, missing rate) grid.

`ray job submit` entry point: the options are exactly those of `sslmm tune`, e.g.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/sweep.py --help
"""

from _entry import run

if __name__ == "__main__":
    run("tune")
