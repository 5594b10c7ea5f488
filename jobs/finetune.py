"""Semi-supervised fine-tuning with modality reconstruction (stage 2).

`ray job submit` entry point: the options are exactly those of `sslmm finetune`, e.g.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- python jobs/finetune.py --help
"""

from _entry import run

if __name__ == "__main__":
    run("finetune")
