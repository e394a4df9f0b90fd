"""The pipeline: the CLI, run names, dvc.yaml generation, the rehearsal inputs."""
