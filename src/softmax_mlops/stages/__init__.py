"""The training deployable: the pipeline stages that dvc.yaml runs, and the two models they train."""
