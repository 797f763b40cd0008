"""The OMoE optimizer itself: config, projector math, the R/O phase, gradient-projection hooks, optimizer groups,
collectives and the distributed environment."""
