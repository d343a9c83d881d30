"""`raytrain tune`: Ray Tune sweeps over any stage."""
