"""Running on a Ray cluster: whether a run's workers and actors fit it (waiting for an autoscaler's nodes), and
`raytrain submit` of the job specs in jobs/."""
