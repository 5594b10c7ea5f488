"""Self-supervised pre-training (stage 1).

`ray job submit` entry point: the options are exactly those of `sslmm pretrain`, e.g.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- python jobs/pretrain.py --help
"""

from _entry import run

if __name__ == "__main__":
    run("pretrain")
