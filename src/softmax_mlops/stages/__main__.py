"""`python -m softmax_mlops.stages <stage>`: the pipeline stages alone, as dvc.yaml runs them."""

from ..cli import main, make_app
from .commands import COMMANDS

app = make_app("The pipeline stages of softmax-mlops, as dvc.yaml runs them (normally through `dvc repro`).", COMMANDS)

if __name__ == "__main__":
    main(app)
