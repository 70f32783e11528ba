"""train.py with rank 1's view of the run made to differ (tests/test_train.py's resume agreement test,
tests/test_replicas.py's drift).

RECIPE_VIEW=phantom   rank 1's listing of output_dir shows a newer checkpoint-999 that rank 0 cannot see
                      (an NFS attribute cache out of date): the main process's choice is what loads
RECIPE_VIEW=weights   rank 1's weights differ after loading: the run stops in one line
RECIPE_VIEW=drift     at the first save every process writes its weights to $RECIPE_DUMP/rank<r>.pt, then
                      rank 1's weights drift: the next evaluation or save stops the run in one line
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import recipe.checkpoint  # noqa: E402
import recipe.train  # noqa: E402

view, rank = os.environ["RECIPE_VIEW"], int(os.environ.get("RANK", "0"))
if rank == 1 and view == "phantom":
    listing = recipe.checkpoint.list_checkpoints
    recipe.checkpoint.list_checkpoints = lambda folder: [*listing(folder), Path(folder) / "checkpoint-999"]
if rank == 1 and view == "weights":
    loaded = recipe.train.resume

    def resume_then_differ(accelerator, *args, **kwargs):
        state = loaded(accelerator, *args, **kwargs)
        model = accelerator._models[0]
        with __import__("torch").no_grad():
            next(model.parameters()).add_(1e-3)
        return state

    recipe.train.resume = resume_then_differ
if view == "drift":
    import torch

    saving, saved = recipe.train.save, []

    def save_then_drift(accelerator, model, *args, **kwargs):
        path = saving(accelerator, model, *args, **kwargs)
        if not saved:
            saved.append(path)
            torch.save(
                recipe.checkpoint.plain_model(model).state_dict(),
                f"{os.environ['RECIPE_DUMP']}/rank{rank}.pt",
            )
            if rank == 1:
                with torch.no_grad():
                    next(model.parameters()).add_(1e-3)
        return path

    recipe.train.save = save_then_drift
sys.argv = [str(ROOT / "recipe" / "train.py"), *sys.argv[1:]]
recipe.train.cli()  # as train.py's __main__ does
