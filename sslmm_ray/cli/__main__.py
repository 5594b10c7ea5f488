"""``python -m sslmm_ray.cli``: the console script."""

from sslmm_ray.cli import main

main()
