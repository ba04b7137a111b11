"""Running experiments: device mesh and hosts, the resumable pass, the workdir, config defaults, XLA flags."""
