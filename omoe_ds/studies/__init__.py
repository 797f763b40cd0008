"""Studies of trained runs: expert diversity, sweeps over a grid, reports and run comparisons."""
