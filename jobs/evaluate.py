"""MMSA metrics of a checkpoint on a split.

`ray job submit` entry point: the options are exactly those of `sslmm evaluate`, e.g.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- python jobs/evaluate.py --help
"""

from _entry import run

if __name__ == "__main__":
    run("evaluate")
