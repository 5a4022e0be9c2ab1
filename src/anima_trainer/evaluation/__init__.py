"""Measuring a network against its frozen base, reproducibly: the numbers that the run's validation, the
in-training evaluation and `anima-trainer eval` share.  Pure functions of the DiT, the injected network, encoded
prompts and fixed seeds; below train (the loop calls them) and tools.

    checkpoints.py  the networks a path names: network files, or every save of a run's output folder
    drift.py        preservation drift, trigger response (relative velocity change vs the base, multiplier 0)
                    and the leak score
    eval_results.py EvalResults: an evaluation's numbers, grids and settings as one document (results.json)
    evaluate.py     `anima-trainer eval`'s work: EvalSpec → plan_evaluation → evaluate → results.json
    grid_cells.py   the grids' cells: each prompt's image per network and strength, batched, exactly as
                    `generate_image` draws it; the base (strength 0) drawn once for all networks
    grid_layout.py  a labelled grid drawn with Pillow (title, header row, label column, cells)
    grids.py        the grid PNGs (networks × strengths per prompt, prompts × networks) with their parameters
    heldout.py      held-out flow loss per σ bucket (fixed noise and σ: what the run's validation computes)
    plots.py        the report's figures (matplotlib's object API, Agg; never pyplot) as PNG bytes
    probe.py        the light metrics at one strength (drift, response, leak; + held-out loss), one function for
                    training and eval
    prompt_bank.py  the built-in anime prompt bank, the probe's and the grids' prompts, kohya prompt files, the
                    trigger put in or left out
    recommend.py    the report's recommendation: the checkpoint (best held-out loss, else rules documented there)
                    and the strengths whose preservation drift stays under a threshold
    report.py       `write_report`: report.html, one self-contained page of an `EvalResults` (plots, grids,
                    tables, the results as a JSON data island)
    results.py      `SigmaMetric`: a value per σ bucket and overall, JSON and tracker scalars
    run_folder.py   a run's settings and validation split rebuilt as train built them; held-out image folders
    strength.py     a network held at one multiplier (0 = the base) in eval mode for a measurement
"""

from anima_trainer.evaluation.drift import leak_score, preservation_drift, trigger_response, velocity_change
from anima_trainer.evaluation.heldout import VALIDATION_SIGMAS, HeldoutBatch, heldout_batches, heldout_loss
from anima_trainer.evaluation.prompt_bank import BankPrompt, builtin_bank, grid_bank, probe_bank, trigger_pairs
from anima_trainer.evaluation.results import SigmaMetric
from anima_trainer.evaluation.strength import at_strength

__all__ = ["VALIDATION_SIGMAS", "BankPrompt", "HeldoutBatch", "SigmaMetric", "at_strength", "builtin_bank",
           "grid_bank", "heldout_batches", "heldout_loss", "leak_score", "preservation_drift", "probe_bank",
           "trigger_pairs",
           "trigger_response", "velocity_change"]
