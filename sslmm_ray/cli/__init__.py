"""The ``sslmm`` command line (typer). Thin: parse, build the config, call the library.

``app`` holds the Typer apps and shared option types, ``render`` the tables; importing the
package registers the commands of ``data``, ``train``, ``tune`` and ``bench``. The library
never imports this package, so there is no import cycle.
"""

from sslmm_ray.cli import bench, data, train, tune  # noqa: F401  (register the commands)
from sslmm_ray.cli.app import app, main

__all__ = ["app", "main"]
