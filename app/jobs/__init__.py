"""Training jobs: trainings started with wait=false, followed and cancelled from any worker."""
