"""Scripts that build latentstore's embedded default model, SAEs and corpus.

They write into ``pipeline/default/`` (the shipped artifacts); this package is
not installed with latentstore. ``python -m embedded.build`` runs every step.
"""

import os

# These scripts train on a few CPU cores that other work often shares. OpenMP
# threads that spin while waiting then burn the cores they wait for: measured
# here at twice the time per step under load. Sleeping waits cost little when
# the machine is idle. Read by OpenMP when torch loads, so set before it does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
