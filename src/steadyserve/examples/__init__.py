"""Example services shipped with steadyserve (the default deployment serves `embedding`)."""
