import os

# Two cores on CI: keep torch from oversubscribing them when tests run in parallel processes.
os.environ.setdefault("OMP_NUM_THREADS", "2")
